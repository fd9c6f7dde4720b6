"""The analysis Task of a study: failed with a reason a person reads, completed on success.

A study that cannot be analysed gets one Task (:func:`build_failed_task`), updated in place on
retry through a conditional update on its identifier
(:func:`~fhir_service.fhir.identifiers.task_identifier`), and completed
(:func:`build_completed_task`) when a later run succeeds.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fhir_service.fhir.datatypes import cc, instant, ref
from fhir_service.fhir.identifiers import task_identifier
from fhir_service.fhir.studies import StudyRef
from fhir_service.fhir.terminology import TERMINOLOGY, Resource, Terminology

__all__ = ["build_completed_task", "build_failed_task"]

_BUSINESS_CODE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def build_failed_task(
    study: Mapping[str, Any],
    reason: str,
    business_status: str,
    *,
    now: datetime | None = None,
    existing_task: Mapping[str, Any] | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """The study's analysis Task, failed, with a human-readable ``reason``.

    ``business_status`` is a short code (``no-pixels``, ``undecodable-image``...) for
    machines; ``reason`` is what a person reads. Write it with a conditional update
    (``PUT`` :func:`task_conditional_url`) so that retries update the one Task of the study;
    ``existing_task`` keeps its id and ``authoredOn``. ``now`` defaults to the current time.
    """
    if not reason.strip():
        raise ValueError("a failed Task needs a reason a person can read")
    if not _BUSINESS_CODE.match(business_status):
        raise ValueError(f"business_status must be a lowercase code, got {business_status!r}")
    t = terminology
    # Leniently read: the failure may be that the study itself is malformed (no subject).
    study_ref = StudyRef.lenient(study)
    system, value = task_identifier(study_ref.id, terminology=t)
    stamp = instant(now or datetime.now(UTC))
    task: Resource = {"resourceType": "Task"}
    if existing_task and existing_task.get("id"):
        task["id"] = existing_task["id"]
    version = f" (version {study_ref.version_id})" if study_ref.version_id else ""
    task.update(
        {
            "identifier": [{"system": system, "value": value}],
            "status": "failed",
            "statusReason": {"text": reason},
            "businessStatus": {
                "coding": [{"system": t.code_system_url("task"), "code": business_status}],
                "text": business_status,
            },
            "intent": "order",
            "code": cc(t.concept("task_code")),
            "description": f"AI analysis of {study_ref.reference}{version} failed: {reason}",
            "focus": ref(study_ref.reference),
            **({"for": ref(study_ref.subject)} if study_ref.subject else {}),
            "authoredOn": (existing_task or {}).get("authoredOn") or stamp,
            "lastModified": stamp,
        }
    )
    return task


def build_completed_task(
    task: Mapping[str, Any],
    *,
    now: datetime | None = None,
    report_reference: str | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """A study's Task (typically failed earlier) completed by a later successful run.

    ``report_reference`` (``DiagnosticReport/{id}``) becomes ``Task.output`` so the Task
    leads to the result. The failure reason goes: it no longer describes the Task's state.
    """
    t = terminology
    out = copy.deepcopy(dict(task))
    out.pop("meta", None)
    out.pop("statusReason", None)
    out["status"] = "completed"
    out["businessStatus"] = cc(t.concept("task_business_completed"))
    focus = (task.get("focus") or {}).get("reference", "the study")
    out["description"] = f"AI analysis of {focus} completed"
    out["lastModified"] = instant(now or datetime.now(UTC))
    if report_reference:
        out["output"] = [
            {"type": cc(t.concept("task_output_report")), "valueReference": ref(report_reference)}
        ]
    return out
