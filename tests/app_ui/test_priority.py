"""Clinical priority leads the worklist, AI urgency second, and each row says why."""

from __future__ import annotations

import asyncio
from typing import Any

from cxr_errors import FhirError
from fhir_service.app_ui.priority import fetch_priorities, study_priorities, with_priority


def _study(sid: str, *based: str) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": sid,
        "basedOn": [{"reference": f"ServiceRequest/{b}"} for b in based],
    }


def _task(tid: str, sid: str, priority: str | None, status: str = "requested") -> dict[str, Any]:
    task: dict[str, Any] = {
        "resourceType": "Task",
        "id": tid,
        "status": status,
        "focus": {"reference": f"ImagingStudy/{sid}"},
    }
    if priority:
        task["priority"] = priority
    return task


def _row(sid: str, urgency: float, **extra: Any) -> dict[str, Any]:
    return {
        "id": sid,
        "status": "done",
        "urgency": urgency,
        "pneumothorax_positive": False,
        **extra,
    }


def test_service_request_and_task_priorities_most_urgent_wins() -> None:
    studies = [_study("a", "sr1"), _study("b", "sr2"), _study("c"), _study("d")]
    requests = [
        {"resourceType": "ServiceRequest", "id": "sr1", "priority": "routine"},
        {"resourceType": "ServiceRequest", "id": "sr2", "priority": "urgent"},
    ]
    tasks = [
        _task("t1", "a", "stat"),  # outranks its routine order
        _task("t2", "c", "asap", status="cancelled"),  # no longer an order
        _task("t3", "d", None),  # cxr's own analysis Task names no priority
        _task("t4", "c", "bogus"),
    ]
    assert study_priorities(studies, requests, tasks) == {
        "a": ("stat", "Task/t1"),
        "b": ("urgent", "ServiceRequest/sr2"),
    }


def test_priority_first_ai_urgency_second_and_the_reason() -> None:
    rows = [  # as clinical.worklist orders them: AI urgency, then pending, then failed
        _row("ptx", 0.9, pneumothorax_positive=True),
        _row("high", 0.7, untrained=True),
        _row("low", 0.1),
        {"id": "pending", "status": "pending"},
        {"id": "failed", "status": "failed", "reason": "truncated PNG"},
    ]
    priorities = {
        "low": ("stat", "ServiceRequest/9"),
        "failed": ("urgent", "Task/4"),
        "high": ("urgent", "Task/5"),
    }
    out = with_priority(rows, priorities)
    assert [r["id"] for r in out] == ["low", "high", "failed", "ptx", "pending"]
    why = {r["id"]: r["why"] for r in out}
    assert (
        why["low"]
        == "STAT order (ServiceRequest/9); then AI urgency 0.10 (highest critical finding)"
    )
    assert why["high"].startswith("URGENT order (Task/5); then AI urgency 0.70")
    assert "untrained model, not a finding" in why["high"]
    assert (
        why["failed"]
        == "URGENT order (Task/4); then AI analysis failed (needs a read without AI help)"
    )
    assert (
        why["ptx"] == "no order priority (routine); then AI: pneumothorax at or above its threshold"
    )
    assert why["pending"].endswith("AI result pending")
    assert out[2]["reason"] == "truncated PNG"  # the failure's own reason is untouched
    assert [r["priority"] for r in out] == ["stat", "urgent", "urgent", "routine", "routine"]


def test_no_orders_keep_the_ai_order() -> None:
    rows = [_row("x", 0.9), _row("y", 0.5), _row("z", 0.1)]
    assert [r["id"] for r in with_priority(rows, {})] == ["x", "y", "z"]


def test_fetch_reads_orders_and_survives_an_ehr_that_refuses_them() -> None:
    calls: list[tuple[str, dict[str, str]]] = []

    async def search(rtype: str, params: dict[str, str]) -> list[dict[str, Any]]:
        calls.append((rtype, params))
        if rtype == "ServiceRequest":
            raise FhirError("ServiceRequest search answered 403")
        return [_task("t1", "a", "asap")]

    studies = [_study("a", "sr1"), _study("b")]
    found = asyncio.run(fetch_priorities(search, studies, by_patient=False))
    assert found == {"a": ("asap", "Task/t1")}
    assert calls == [
        ("ServiceRequest", {"_id": "sr1"}),
        (
            "Task",
            {"focus": "ImagingStudy/a,ImagingStudy/b", "priority": "stat,asap,urgent,routine"},
        ),
    ]
    calls.clear()
    asyncio.run(fetch_priorities(search, studies, by_patient=True))
    assert [c[1] for c in calls] == [{"priority": "stat,asap,urgent,routine"}] * 2
