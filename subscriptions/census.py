"""The invariant, checked: every available ImagingStudy is in exactly one state.

========================  ==============================================================
state                     what FHIR and the queue show
========================  ==============================================================
reported                  one current DiagnosticReport for this model version
failed                    one failed Task (its businessStatus is the reason)
waiting for images        a Task ``on-hold`` / ``waiting-for-images`` before its deadline
in flight                 a job queued or running, or posted so recently that its
                          notification may still be on its way
========================  ==============================================================

A study that is none of these within the bound (``stuck_after`` past its last update, its
wait for an image or its job's start) is **stuck**, and so is one that breaks the invariant
(two current reports; a report beside a Task still open; a report whose embeddings are not in
the similar-case index). ``cxr status`` prints the census and exits non-zero when anything is
stuck; the worker's periodic stuck sweep queues the stuck studies again (the job is
idempotent, so that only ever completes what was left undone).
Studies ``registered`` (waiting to become available) and withdrawn ones are counted apart.

The census reads HAPI in pages and batches (studies, then reports 100 studies per search,
then every Task of ours at once), the queue and the similar-case index in one query each, so
it costs O(studies / 100) requests, not one per study.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import psycopg

from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.identifiers import study_model_identifier
from fhir_service.fhir.tasks import task_business_status, waiting_deadline
from fhir_service.fhir.terminology import TERMINOLOGY
from subscriptions.lifecycle import LIVE_REPORT_STATUSES, WITHDRAWN_STATUSES, last_updated
from vector_store.store import indexed_studies

__all__ = ["Census", "State", "StudyState", "requeue_stuck", "take_census"]

_BATCH = 100


class State(StrEnum):
    REPORTED = "reported"
    FAILED = "failed"
    WAITING = "waiting for images"
    IN_FLIGHT = "in flight"
    REGISTERED = "registered (not yet available)"
    WITHDRAWN = "withdrawn"


@dataclass(frozen=True)
class StudyState:
    study_id: str
    state: State
    updated: datetime
    detail: str = ""
    """failed: the Task's businessStatus; waiting: the deadline; in flight: the job's status"""
    stuck: str | None = None
    """why the study is stuck, or None"""


@dataclass
class Census:
    studies: list[StudyState] = field(default_factory=list)
    live_workers: int = 0
    """workers with a heartbeat in the last 30 s"""

    @property
    def counts(self) -> Counter[str]:
        return Counter(s.state.value for s in self.studies)

    @property
    def failed_by_reason(self) -> Counter[str]:
        return Counter(s.detail for s in self.studies if s.state is State.FAILED)

    @property
    def stuck(self) -> list[StudyState]:
        return [s for s in self.studies if s.stuck]

    @property
    def unserved(self) -> int:
        """Jobs waiting while no worker is alive to take them (0 when any worker is)."""
        if self.live_workers:
            return 0
        return sum(1 for s in self.studies if s.state is State.IN_FLIGHT and s.detail == "todo")


@dataclass(frozen=True)
class _Job:
    status: str
    since: datetime
    """when it was queued (todo) or started (doing)"""


def take_census(
    fhir: FhirClient,
    dsn: str,
    model_version: str,
    *,
    image_wait: timedelta,
    stuck_after: timedelta,
    since: datetime | None = None,
    now: datetime | None = None,
) -> Census:
    """The state of every ImagingStudy updated after ``since`` (all of them by default)."""
    now = now or datetime.now(UTC)
    params = {"_count": "500", "_elements": "status"}
    if since is not None:
        params["_lastUpdated"] = f"gt{since.isoformat()}"
    studies = list(fhir.search_all("ImagingStudy", params))
    available = [str(s["id"]) for s in studies if s.get("status") == "available"]
    reports = _current_reports(fhir, available, model_version)
    tasks = _tasks(fhir)
    jobs, live_workers = _jobs(dsn)
    indexed = _indexed(dsn, [sid for sid in available if reports.get(sid)], model_version)
    judge = _Judge(now, image_wait, stuck_after)
    census = Census(live_workers=live_workers)
    for study in studies:
        sid = str(study["id"])
        state = judge(study, reports.get(sid, 0), tasks.get(sid), jobs.get(sid, []))
        if state.state is State.REPORTED and not state.stuck and sid not in indexed:
            state = judge.unindexed(state)
        census.studies.append(state)
    return census


def _current_reports(
    fhir: FhirClient, study_ids: Sequence[str], model_version: str
) -> Counter[str]:
    """study id → how many current reports for this model it has."""
    system = TERMINOLOGY.identifier_system("report_study_model")
    by_value = {study_model_identifier(sid, model_version)[1]: sid for sid in study_ids}
    values = list(by_value)
    counts: Counter[str] = Counter()
    for i in range(0, len(values), _BATCH):
        chunk = values[i : i + _BATCH]
        params = {
            "identifier": ",".join(f"{system}|{v}" for v in chunk),
            "_elements": "identifier,status",
            "_count": "1000",
        }
        for report in fhir.search_all("DiagnosticReport", params):
            if report.get("status") not in LIVE_REPORT_STATUSES:
                continue
            for ident in report.get("identifier", []):
                if ident.get("system") == system and ident.get("value") in by_value:
                    counts[by_value[ident["value"]]] += 1
    return counts


def _tasks(fhir: FhirClient) -> dict[str, dict[str, Any]]:
    system = TERMINOLOGY.identifier_system("task")
    out: dict[str, dict[str, Any]] = {}
    for task in fhir.search_all("Task", {"identifier": f"{system}|", "_count": "500"}):
        focus = str((task.get("focus") or {}).get("reference") or "")
        if focus.startswith("ImagingStudy/"):
            out[focus.split("/")[1]] = task
    return out


def _indexed(dsn: str, study_ids: Sequence[str], model_version: str) -> set[str]:
    """Which reported studies have their row in the similar-case index (all of them when
    this database has no index table: a deployment without one has nothing to lose there)."""
    if not study_ids:
        return set()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        found = indexed_studies(conn, study_ids, model_version)
    return set(study_ids) if found is None else found


def _jobs(dsn: str) -> tuple[dict[str, list[_Job]], int]:
    """Queued or running study jobs by study (with when each was queued or started), and how
    many workers are alive."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT j.args->>'study_id', j.status::text, "
            "coalesce((SELECT max(e.at) FROM procrastinate_events e WHERE e.job_id = j.id "
            "AND e.type::text = CASE WHEN j.status = 'doing' THEN 'started' ELSE 'deferred' "
            "END), now()) FROM procrastinate_jobs j "
            "WHERE j.task_name = 'cxr.process_study' AND j.status IN ('todo', 'doing')"
        ).fetchall()
        live = conn.execute(
            "SELECT count(*) FROM procrastinate_workers "
            "WHERE last_heartbeat > now() - interval '30 seconds'"
        ).fetchone()
    out: dict[str, list[_Job]] = {}
    for study_id, status, since in rows:
        out.setdefault(str(study_id), []).append(_Job(str(status), since))
    return out, int(live[0]) if live else 0


@dataclass(frozen=True)
class _Judge:
    now: datetime
    image_wait: timedelta
    stuck_after: timedelta

    def __call__(
        self,
        study: dict[str, Any],
        reports: int,
        task: dict[str, Any] | None,
        jobs: Iterable[_Job],
    ) -> StudyState:
        sid = str(study["id"])
        updated = last_updated(study) or self.now
        status = study.get("status")
        task_status = (task or {}).get("status")
        if status in WITHDRAWN_STATUSES:
            open_task = task_status in ("on-hold", "failed", "requested", "in-progress")
            late = open_task and self.now - updated > self.stuck_after
            why = f"withdrawn but its Task is still {task_status}" if late else None
            return StudyState(sid, State.WITHDRAWN, updated, str(status), why)
        if status != "available":
            return StudyState(sid, State.REGISTERED, updated, str(status))
        if reports:
            return self._reported(sid, updated, reports, task_status)
        jobs = list(jobs)
        if jobs:
            # A queued job waits its turn (a backlog shows as queue depth, not as stuck); a
            # running one past the bound is stuck (a dead worker's is retried by the worker).
            running = [j for j in jobs if j.status == "doing"]
            stuck = (
                f"its job has been running since {running[0].since:%Y-%m-%d %H:%M:%S}"
                if running and self.now - running[0].since > self.stuck_after
                else None
            )
            return StudyState(sid, State.IN_FLIGHT, updated, "doing" if running else "todo", stuck)
        if task_status == "failed":
            return StudyState(sid, State.FAILED, updated, task_business_status(task or {}) or "")
        deadline = waiting_deadline(task) if task else None
        if deadline is not None:
            stuck = (
                f"its wait for an image ended at {deadline:%Y-%m-%d %H:%M:%S} and it has not failed"
                if self.now - deadline > self.stuck_after
                else None
            )
            return StudyState(sid, State.WAITING, updated, deadline.isoformat(), stuck)
        stuck = (
            "no report, no Task and no job "
            f"{int((self.now - updated).total_seconds())} s after it was last updated"
            if self.now - updated > self.stuck_after
            else None
        )
        return StudyState(sid, State.IN_FLIGHT, updated, "not queued yet", stuck)

    def _reported(
        self, sid: str, updated: datetime, reports: int, task_status: str | None
    ) -> StudyState:
        if reports > 1:
            return StudyState(sid, State.REPORTED, updated, "", f"{reports} current reports")
        if task_status in ("failed", "on-hold") and self.now - updated > self.stuck_after:
            return StudyState(
                sid, State.REPORTED, updated, "", f"reported, but its Task is still {task_status}"
            )
        return StudyState(sid, State.REPORTED, updated)

    def unindexed(self, state: StudyState) -> StudyState:
        """A report whose embeddings never reached the similar-case index (the job stopped
        between the FHIR transaction and the upsert, or the store failed): ``$similar`` can
        never find it. Queued again, the job stores them without writing to FHIR."""
        if self.now - state.updated <= self.stuck_after:
            return state
        return replace(state, stuck="reported, but not in the similar-case index")


def requeue_stuck(census: Census, enqueue: Callable[[str, str], bool]) -> int:
    """Queue every stuck study whose job can finish what was left undone (not a running one:
    a dead worker's job is retried by the worker; two reports are for a person to look at)."""
    queued = 0
    for s in census.stuck:
        if s.state is State.IN_FLIGHT and s.detail == "doing":
            continue
        if s.state is State.REPORTED and s.stuck and s.stuck.endswith("current reports"):
            continue
        if enqueue(s.study_id, "stuck"):
            queued += 1
    return queued
