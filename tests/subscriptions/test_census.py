"""The census behind ``cxr status`` and the stuck sweep: one state per study, and what is stuck,
from an in-memory FHIR server and a stand-in for the queue table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fhir_service.fhir.identifiers import study_model_identifier, task_identifier
from fhir_service.fhir.tasks import build_failed_task, build_waiting_task
from subscriptions import census as census_module
from subscriptions.census import Census, State, requeue_stuck, take_census
from tests.fake_fhir import FakeFhir

BOUND = timedelta(minutes=10)
WAIT = timedelta(minutes=15)
MODEL = "test-model"


def _study(server: FakeFhir, sid: str, status: str = "available") -> dict[str, Any]:
    return server.put(
        {"resourceType": "ImagingStudy", "id": sid, "status": status,
         "subject": {"reference": "Patient/p"}}
    )  # fmt: skip


def _report(server: FakeFhir, sid: str, status: str = "preliminary") -> None:
    system, value = study_model_identifier(sid, MODEL)
    server.put(
        {"resourceType": "DiagnosticReport", "status": status,
         "identifier": [{"system": system, "value": value}]}
    )  # fmt: skip


def _census(
    server: FakeFhir,
    monkeypatch: pytest.MonkeyPatch,
    jobs: dict[str, list[Any]] | None = None,
    *,
    now: datetime,
    live: int = 1,
    unindexed: frozenset[str] = frozenset(),
) -> Census:
    monkeypatch.setattr(census_module, "_jobs", lambda dsn: (jobs or {}, live))
    monkeypatch.setattr(
        census_module, "_indexed", lambda dsn, ids, model: set(ids) - set(unindexed)
    )
    return take_census(
        server.client(), "postgresql://unused", MODEL, image_wait=WAIT, stuck_after=BOUND, now=now
    )


def test_each_study_is_in_exactly_one_state(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeFhir()
    for sid in ("rep", "fail", "wait", "queued", "new", "reg", "gone"):
        _study(server, sid, {"reg": "registered", "gone": "cancelled"}.get(sid, "available"))
    _report(server, "rep")
    _report(server, "rep", status="cancelled")  # an older image's report: not current
    studies = {s["id"]: s for s in server.all("ImagingStudy")}
    server.put(build_failed_task(studies["fail"], "bad image", "undecodable-image"))
    now = server.clock + timedelta(seconds=5)
    server.put(build_waiting_task(studies["wait"], "waiting", now + WAIT))
    queued = census_module._Job("todo", now)
    census = _census(server, monkeypatch, {"queued": [queued]}, now=now)
    states = {s.study_id: s.state for s in census.studies}
    assert states == {
        "rep": State.REPORTED,
        "fail": State.FAILED,
        "wait": State.WAITING,
        "queued": State.IN_FLIGHT,
        "new": State.IN_FLIGHT,
        "reg": State.REGISTERED,
        "gone": State.WITHDRAWN,
    }
    assert census.failed_by_reason == {"undecodable-image": 1}
    assert census.stuck == []
    assert census.counts["in flight"] == 2


def test_what_is_stuck_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeFhir()
    for sid in ("lost", "expired", "twice", "open", "running", "backlog"):
        _study(server, sid)
    studies = {s["id"]: s for s in server.all("ImagingStudy")}
    _report(server, "twice")
    _report(server, "twice")
    _report(server, "open")
    server.put(build_failed_task(studies["open"], "no image", "no-pixels"))
    late = server.clock + BOUND + WAIT + timedelta(minutes=1)
    server.put(build_waiting_task(studies["expired"], "waiting", server.clock + WAIT))
    jobs = {
        "running": [census_module._Job("doing", server.clock)],
        "backlog": [census_module._Job("todo", server.clock)],
    }
    census = _census(server, monkeypatch, jobs, now=late)
    stuck = {s.study_id: s.stuck for s in census.stuck}
    assert set(stuck) == {"lost", "expired", "twice", "open", "running"}
    assert "no report, no Task and no job" in (stuck["lost"] or "")
    assert "has not failed" in (stuck["expired"] or "")
    assert stuck["twice"] == "2 current reports"
    assert "Task is still failed" in (stuck["open"] or "")
    assert "running since" in (stuck["running"] or "")
    # a queued job waits its turn: a backlog is queue depth, not stuck
    assert "backlog" not in stuck
    queued: list[str] = []
    n = requeue_stuck(census, lambda sid, ver: queued.append(sid) is None)
    # not the running one (its worker is retried) nor two reports (for a person to look at)
    assert sorted(queued) == ["expired", "lost", "open"] and n == 3


def test_a_report_missing_from_the_similar_case_index_is_stuck_and_queued_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job stopped between the FHIR transaction and the embedding upsert: FHIR says
    reported, ``$similar`` can never find it. Past the bound the census says so and the stuck
    sweep queues it (the job then writes the embeddings only)."""
    server = FakeFhir()
    for sid in ("indexed", "unindexed"):
        _study(server, sid)
        _report(server, sid)
    gap = frozenset({"unindexed"})
    soon = _census(server, monkeypatch, now=server.clock + BOUND / 2, unindexed=gap)
    assert soon.stuck == [] and soon.counts == {"reported": 2}
    late = _census(server, monkeypatch, now=server.clock + BOUND * 2, unindexed=gap)
    assert late.counts == {"reported": 2}
    (stuck,) = late.stuck
    assert stuck.study_id == "unindexed"
    assert stuck.stuck == "reported, but not in the similar-case index"
    queued: list[str] = []
    assert requeue_stuck(late, lambda sid, ver: queued.append(sid) is None) == 1
    assert queued == ["unindexed"]


def test_jobs_with_no_worker_alive_are_unserved(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeFhir()
    _study(server, "s")
    jobs = {"s": [census_module._Job("todo", server.clock)]}
    census = _census(server, monkeypatch, jobs, now=server.clock, live=0)
    assert census.unserved == 1
    assert _census(server, monkeypatch, jobs, now=server.clock, live=2).unserved == 0


def test_task_identifier_is_per_study() -> None:
    # the census maps Tasks to studies by focus; the identifier is the study alone
    assert task_identifier("s1")[1] == "s1"
    assert datetime.now(UTC).tzinfo is not None
