"""Clinical priority of a study, from its order: the worklist's first sort key (issue 18).

The order's priority is the clinician's, and it outranks the AI's urgency: a ``stat`` chest
film with an unremarkable AI result is read before a ``routine`` one with a high score. It is
read from (R4, request-priority: ``stat`` > ``asap`` > ``urgent`` > ``routine``):

- the ``ServiceRequest`` the study is ``basedOn``, and
- any ``Task`` whose ``focus`` is the study and that names a ``priority`` (a workflow Task of
  the EHR; cxr's own analysis Task names none),

the most urgent of them winning. A study without either is ``routine`` (the default a
radiology worklist assumes), and says so. Every row carries a ``why`` naming both keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from cxr_errors import FhirError
from fhir_service.app_ui.clinical import ref_id

log = logging.getLogger(__name__)
#: The app's launch-bound search: (type, params) → resources.
Search = Callable[[str, dict[str, str]], Awaitable[list[dict[str, Any]]]]

#: request-priority codes, most urgent first.
PRIORITY_RANK = {"stat": 0, "asap": 1, "urgent": 2, "routine": 3}
DEFAULT_PRIORITY = "routine"
#: Task statuses that no longer carry an order.
_CLOSED_TASK = ("cancelled", "entered-in-error", "rejected")


def study_priorities(
    studies: Iterable[Mapping[str, Any]],
    service_requests: Iterable[Mapping[str, Any]],
    tasks: Iterable[Mapping[str, Any]],
) -> dict[str, tuple[str, str]]:
    """Study id → (priority, where it came from: ``ServiceRequest/…`` or ``Task/…``), for
    the studies that have an order naming one."""
    requests = {
        str(r.get("id")): str(r["priority"])
        for r in service_requests
        if r.get("priority") in PRIORITY_RANK
    }
    out: dict[str, tuple[str, str]] = {}

    def offer(sid: str, priority: str, source: str) -> None:
        seen = out.get(sid)
        if seen is None or PRIORITY_RANK[priority] < PRIORITY_RANK[seen[0]]:
            out[sid] = (priority, source)

    for study in studies:
        sid = str(study.get("id"))
        for based in study.get("basedOn", []):
            rid = ref_id(based, "ServiceRequest")
            if rid is not None and rid in requests:
                offer(sid, requests[rid], f"ServiceRequest/{rid}")
    for task in tasks:
        focus = ref_id(task.get("focus"), "ImagingStudy")
        priority = task.get("priority")
        if focus and priority in PRIORITY_RANK and task.get("status") not in _CLOSED_TASK:
            offer(focus, str(priority), f"Task/{task.get('id')}")
    return out


def service_request_ids(studies: Iterable[Mapping[str, Any]]) -> list[str]:
    """The ServiceRequests the studies are based on (for a search by ``_id``)."""
    ids = [
        rid
        for s in studies
        for b in s.get("basedOn", [])
        if (rid := ref_id(b, "ServiceRequest")) is not None
    ]
    return list(dict.fromkeys(ids))


def rank(priority: str | None) -> int:
    return PRIORITY_RANK.get(priority or DEFAULT_PRIORITY, PRIORITY_RANK[DEFAULT_PRIORITY])


def _ai_reason(row: Mapping[str, Any]) -> str:
    status = row.get("status")
    if status == "failed":
        return "AI analysis failed (needs a read without AI help)"
    if status != "done":
        return "AI result pending"
    untrained = " — untrained model, not a finding" if row.get("untrained") else ""
    if row.get("pneumothorax_positive"):
        return f"AI: pneumothorax at or above its threshold{untrained}"
    return (
        f"AI urgency {float(row.get('urgency') or 0.0):.2f} (highest critical finding){untrained}"
    )


def with_priority(
    rows: list[dict[str, Any]], priorities: Mapping[str, tuple[str, str]]
) -> list[dict[str, Any]]:
    """The worklist rows (already in AI-urgency order) re-sorted by clinical priority first,
    stable within one priority, each with ``priority``, ``priority_source`` and ``why``
    (both sort keys in words)."""
    out = []
    for row in rows:
        priority, source = priorities.get(str(row.get("id")), (DEFAULT_PRIORITY, None))
        said = (
            f"{priority.upper()} order ({source})"
            if source
            else f"no order priority ({DEFAULT_PRIORITY})"
        )
        out.append(
            {
                **row,
                "priority": priority,
                "priority_source": source,
                "why": f"{said}; then {_ai_reason(row)}",
            }
        )
    out.sort(key=lambda r: rank(r["priority"]))
    return out


async def fetch_priorities(
    search: Search, studies: list[dict[str, Any]], *, by_patient: bool
) -> dict[str, tuple[str, str]]:
    """Read the orders and return :func:`study_priorities`. ``search(rtype, params)`` is the
    app's launch-bound search; in patient mode (``by_patient``) it reads the patient's
    orders, in user mode those of exactly these studies. An EHR that grants no read of
    ServiceRequest or Task gives no priorities, not an error (every study is then routine)."""
    codes = ",".join(PRIORITY_RANK)
    refs = ",".join(f"ImagingStudy/{s.get('id')}" for s in studies)
    request_ids = service_request_ids(studies)

    async def safe(rtype: str, params: dict[str, str]) -> list[dict[str, Any]]:
        try:
            return await search(rtype, params)
        except FhirError as exc:
            log.info("no %s priorities: %s", rtype, exc)
            return []

    if not studies:
        return {}
    request_params = {"priority": codes} if by_patient else {"_id": ",".join(request_ids)}
    task_params = {"priority": codes} if by_patient else {"focus": refs, "priority": codes}
    requests, tasks = await asyncio.gather(
        safe("ServiceRequest", request_params) if by_patient or request_ids else _none(),
        safe("Task", task_params),
    )
    return study_priorities(studies, requests, tasks)


async def _none() -> list[dict[str, Any]]:
    return []
