"""The analysis Task of a study: the one place its state is visible in FHIR.

A study has at most one Task, keyed on the study (:func:`~fhir_service.fhir.identifiers.
task_identifier`) and updated in place, never duplicated:

* ``on-hold`` / businessStatus ``waiting-for-images`` (:func:`build_waiting_task`): the study
  is available but no image has arrived yet; ``restriction.period.end`` is when the wait ends;
* ``failed`` with a reason a person reads (:func:`build_failed_task`);
* ``completed`` (:func:`build_completed_task`) when a later run wrote the report, with the
  earlier state as its ``statusReason`` (an image that arrived after the wait ran out);
* ``cancelled`` (:func:`build_cancelled_task`) when the study was withdrawn (its status became
  ``cancelled`` or ``entered-in-error``).

A study without a Task and without a report is simply in flight.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from fhir_service.fhir.datatypes import cc, instant, ref, urn
from fhir_service.fhir.identifiers import task_identifier
from fhir_service.fhir.studies import StudyRef
from fhir_service.fhir.terminology import TERMINOLOGY, Resource, Terminology

__all__ = [
    "WAITING_FOR_IMAGES",
    "WITHDRAWN",
    "build_cancelled_task",
    "build_completed_task",
    "build_failed_task",
    "build_waiting_task",
    "closing_reason",
    "task_business_status",
    "task_closure_entry",
    "waiting_deadline",
]

_BUSINESS_CODE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
#: businessStatus of a Task whose study has no image yet.
WAITING_FOR_IMAGES = "waiting-for-images"
#: businessStatus of a Task whose study was withdrawn.
WITHDRAWN = "withdrawn"


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
    return _study_task(
        study,
        "failed",
        reason,
        business_status,
        lambda ref_text: f"AI analysis of {ref_text} failed: {reason}",
        now=now,
        existing_task=existing_task,
        terminology=terminology,
    )


def build_waiting_task(
    study: Mapping[str, Any],
    reason: str,
    deadline: datetime,
    *,
    now: datetime | None = None,
    existing_task: Mapping[str, Any] | None = None,
    pacs_study_uid: str | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """The study's Task ``on-hold``, waiting for its image until ``deadline``.

    ``restriction.period.end`` ("over what time-period fulfillment is sought") carries the
    deadline for machines; ``statusReason.text`` says the same for people. With
    ``pacs_study_uid`` the image is awaited in the PACS, which notifies nobody: an ``input``
    names the Study Instance UID, and the sweep looks for it again (:func:`awaited_in_pacs`).
    """
    task = _study_task(
        study,
        "on-hold",
        reason,
        WAITING_FOR_IMAGES,
        lambda ref_text: f"AI analysis of {ref_text} is waiting for its image",
        now=now,
        existing_task=existing_task,
        terminology=terminology,
    )
    task["restriction"] = {"period": {"end": instant(deadline)}}
    if pacs_study_uid:
        task["input"] = [
            {
                "type": cc(terminology.concept("task_input_pacs_study")),
                "valueIdentifier": {
                    "system": terminology.identifier_system("dicom_uid"),
                    "value": f"urn:oid:{pacs_study_uid}",
                },
            }
        ]
    return task


def _study_task(
    study: Mapping[str, Any],
    status: str,
    reason: str,
    business_status: str,
    description: Callable[[str], str],
    *,
    now: datetime | None,
    existing_task: Mapping[str, Any] | None,
    terminology: Terminology,
) -> Resource:
    if not reason.strip():
        raise ValueError(f"a {status} Task needs a reason a person can read")
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
            "status": status,
            "statusReason": {"text": reason},
            "businessStatus": {
                "coding": [{"system": t.code_system_url("task"), "code": business_status}],
                "text": business_status,
            },
            "intent": "order",
            "code": cc(t.concept("task_code")),
            "description": description(f"{study_ref.reference}{version}"),
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
    reason: str | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """A study's Task (failed or waiting earlier) completed by a later successful run.

    ``report_reference`` (``DiagnosticReport/{id}``) becomes ``Task.output`` so the Task
    leads to the result. The old reason goes (it no longer describes the Task's state);
    ``reason`` says why the Task was completed after all (e.g. an image that came late).
    """
    t = terminology
    out = _closed(task, "completed", reason, now)
    out["businessStatus"] = cc(t.concept("task_business_completed"))
    out["description"] = f"AI analysis of {_focus(task)} completed"
    if report_reference:
        out["output"] = [
            {"type": cc(t.concept("task_output_report")), "valueReference": ref(report_reference)}
        ]
    return out


def _closed(
    task: Mapping[str, Any], status: str, reason: str | None, now: datetime | None
) -> Resource:
    """A copy of ``task`` in a final ``status``: what it awaited, its deadline and its old
    reason go (they no longer describe it), ``reason`` (if any) says why it ended."""
    out = copy.deepcopy(dict(task))
    for gone in ("meta", "statusReason", "restriction", "input"):
        out.pop(gone, None)
    out["status"] = status
    if reason:
        out["statusReason"] = {"text": reason}
    out["lastModified"] = _not_before_authored(out, now or datetime.now(UTC))
    return out


def _focus(task: Mapping[str, Any]) -> str:
    return str((task.get("focus") or {}).get("reference", "the study"))


def _not_before_authored(task: Mapping[str, Any], when: datetime) -> str:
    """``when`` as the Task's ``lastModified``, but never before its ``authoredOn`` (FHIR's
    inv-1, which HAPI enforces): a result recorded before the Task was written (a clock a
    little behind, a replayed run) still closes it."""
    authored = task.get("authoredOn")
    # An authoredOn we cannot read (or without a zone) is left to HAPI to name.
    with contextlib.suppress(TypeError, ValueError):
        if authored:
            when = max(when, datetime.fromisoformat(str(authored)))
    return instant(when)


def closing_reason(task: Mapping[str, Any]) -> str:
    """Why an open Task is completed after all: what it said before the report came."""
    status = task.get("status")
    earlier = (task.get("statusReason") or {}).get("text") or status
    if status == "failed":
        return f"completed after an earlier failure, which no longer holds: {earlier}"
    if status == "on-hold":
        return "the image arrived while the study was waiting for it"
    return f"completed (was {status})"


def task_closure_entry(
    task: Mapping[str, Any],
    report_reference: str,
    *,
    now: datetime | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """The transaction entry that completes ``task`` (as read from the server) in the same
    commit as its report (``report_reference`` may be the report's ``urn:uuid`` fullUrl), so
    no reader sees a report next to a Task that still waits or has failed.

    The update is conditional on the version read (``ifMatch``): if the Task changed in the
    meantime (the deadline sweep failed it), the whole transaction is refused and retried."""
    done = build_completed_task(
        task,
        now=now,
        report_reference=report_reference,
        reason=closing_reason(task),
        terminology=terminology,
    )
    request: dict[str, str] = {"method": "PUT", "url": f"Task/{task['id']}"}
    version = (task.get("meta") or {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    # HAPI wants an absolute fullUrl on every entry; the server base is not ours to know here.
    return {"fullUrl": urn(f"task-{task['id']}", "closure"), "resource": done, "request": request}


def build_cancelled_task(
    task: Mapping[str, Any],
    reason: str,
    *,
    now: datetime | None = None,
    terminology: Terminology = TERMINOLOGY,
) -> Resource:
    """A study's Task closed because the study was withdrawn (``cancelled`` /
    ``entered-in-error``): nothing will be analysed, and ``reason`` says why."""
    if not reason.strip():
        raise ValueError("a cancelled Task needs a reason a person can read")
    t = terminology
    out = _closed(task, "cancelled", reason, now)
    out["businessStatus"] = {
        "coding": [{"system": t.code_system_url("task"), "code": WITHDRAWN}],
        "text": WITHDRAWN,
    }
    out["description"] = f"AI analysis of {_focus(task)} cancelled: {reason}"
    return out


def task_business_status(task: Mapping[str, Any]) -> str | None:
    """The machine code of a Task's businessStatus (``no-pixels``, ``waiting-for-images``...)."""
    codings = (task.get("businessStatus") or {}).get("coding") or [{}]
    code = codings[0].get("code")
    return str(code) if code else None


def awaited_in_pacs(task: Mapping[str, Any], terminology: Terminology = TERMINOLOGY) -> bool:
    """Whether a waiting Task awaits its image in the PACS (see :func:`build_waiting_task`)."""
    if waiting_deadline(task) is None:
        return False
    code = terminology.concept("task_input_pacs_study")["code"]
    return any(
        c.get("code") == code
        for i in task.get("input") or []
        for c in (i.get("type") or {}).get("coding") or []
    )


def waiting_deadline(task: Mapping[str, Any]) -> datetime | None:
    """When a waiting Task's wait for images ends; None for any other Task."""
    if task.get("status") != "on-hold" or task_business_status(task) != WAITING_FOR_IMAGES:
        return None
    end = ((task.get("restriction") or {}).get("period") or {}).get("end")
    if not end:
        return None
    return datetime.fromisoformat(str(end).replace("Z", "+00:00"))
