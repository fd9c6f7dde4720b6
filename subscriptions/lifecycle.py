"""A study's one Task through its life: waiting for images, failed, completed, cancelled.

What the job does besides writing a report, all visible in FHIR:

* **No image yet.** ``ImagingStudy.status`` ``available`` says the study may be read, but a
  PACS-fed EHR registers the study before the pixels exist and posts the ``Media`` after it.
  Such a study waits (Task ``on-hold``, businessStatus ``waiting-for-images``, the deadline in
  ``restriction.period.end``) until ``image_wait`` after its last update; the Media's own
  notification, or the sweep once the deadline has passed, runs the job again, which then
  reports it or fails it with a reason.
* **Late image.** An image that arrives after the study failed for want of one still gets its
  report: the job reads the study as it is now, and the failed Task is then completed with
  the earlier failure as its reason, so the study ends in one state.
* **Withdrawn study.** ``cancelled`` / ``entered-in-error``: nothing is analysed and an open
  Task is cancelled; for ``entered-in-error`` every result of ours for the study (reports,
  Observations, heatmaps) is marked ``entered-in-error`` too — the study should never have
  existed, and neither should what was derived from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cxr_errors import MissingImageError, NotInPacsYetError
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.identifiers import task_identifier
from fhir_service.fhir.results import is_cxr_overlay
from fhir_service.fhir.supersede import entered_in_error_transaction
from fhir_service.fhir.tasks import (
    build_cancelled_task,
    build_completed_task,
    build_failed_task,
    build_waiting_task,
    closing_reason,
    task_business_status,
    waiting_deadline,
)
from fhir_service.fhir.terminology import TERMINOLOGY

log = logging.getLogger(__name__)

__all__ = [
    "LIVE_REPORT_STATUSES",
    "WITHDRAWN_STATUSES",
    "StudyTasks",
    "last_updated",
    "study_deadline",
]

#: ImagingStudy statuses that withdraw a study from analysis.
WITHDRAWN_STATUSES = ("cancelled", "entered-in-error")
#: DiagnosticReport statuses of a current report; a superseded one is ``cancelled``, one of a
#: study entered in error ``entered-in-error`` (fhir_service.fhir.supersede).
LIVE_REPORT_STATUSES = (
    "preliminary",
    "final",
    "amended",
    "corrected",
    "appended",
    "partial",
    "registered",
)
_OPEN = ("failed", "on-hold", "requested", "ready", "in-progress")


def last_updated(resource: Mapping[str, Any]) -> datetime | None:
    stamp = (resource.get("meta") or {}).get("lastUpdated")
    if not stamp:
        return None
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))


def study_deadline(study: Mapping[str, Any], wait: timedelta) -> datetime:
    """Until when a study without an image waits: ``wait`` after its last update, so posting
    a new version of the study (re-sending it) starts a new wait."""
    deadline = (last_updated(study) or datetime.now(UTC)) + wait
    # FHIR instants as HAPI writes them: milliseconds, so the Task's copy compares equal.
    return deadline.replace(microsecond=deadline.microsecond // 1000 * 1000)


def _fmt(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(wait: timedelta) -> str:
    seconds = int(wait.total_seconds())
    if seconds % 60 == 0 and seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"


@dataclass
class StudyTasks:
    """Reads and writes the one Task of a study (conditional on its identifier)."""

    fhir: FhirClient
    image_wait: timedelta = timedelta(0)
    on_fail: Callable[[str], None] | None = None
    """told the businessStatus of every failed Task written (the failure metrics)"""

    def read(self, study_id: str) -> dict[str, Any] | None:
        system, value = task_identifier(study_id)
        bundle = self.fhir.search("Task", {"identifier": f"{system}|{value}"})
        entries = bundle.get("entry", [])
        return dict(entries[0]["resource"]) if entries else None

    def put(self, task: dict[str, Any]) -> None:
        if task.get("id"):
            self.fhir.update(task)
        else:
            system, value = task_identifier(task["focus"]["reference"].split("/")[-1])
            self.fhir.create(task, if_none_exist=f"identifier={system}|{value}")

    def fail(self, study: Mapping[str, Any], reason: str, business_status: str) -> None:
        log.warning("ImagingStudy/%s failed (%s): %s", study["id"], business_status, reason)
        task = build_failed_task(
            study, reason, business_status, existing_task=self.read(study["id"])
        )
        self.put(task)
        if self.on_fail is not None:
            self.on_fail(business_status)

    def missing_image(
        self, study: Mapping[str, Any], exc: MissingImageError, *, now: datetime | None = None
    ) -> str:
        """Wait for the image (until the deadline) or fail for want of one; the outcome."""
        now = now or datetime.now(UTC)
        deadline = study_deadline(study, self.image_wait)
        existing = self.read(study["id"])
        if now < deadline:
            if existing is not None and waiting_deadline(existing) == deadline:
                return f"waiting for images until {_fmt(deadline)}"
            reason = (
                f"waiting for the image: {exc.message}. The study fails if none arrives by "
                f"{_fmt(deadline)} ({_span(self.image_wait)} after it was last updated)"
            )
            task = build_waiting_task(
                study,
                reason,
                deadline,
                now=now,
                existing_task=existing,
                pacs_study_uid=exc.study_uid if isinstance(exc, NotInPacsYetError) else None,
            )
            self.put(task)
            log.info("ImagingStudy/%s waits for its image until %s", study["id"], _fmt(deadline))
            return f"waiting for images until {_fmt(deadline)}"
        reason = (
            f"{exc.message}; none arrived within {_span(self.image_wait)} of the study's last "
            "update. Post a Media with partOf this study and it will still be analysed"
        )
        if (
            existing is not None
            and existing.get("status") == "failed"
            and task_business_status(existing) == "no-pixels"
        ):
            return f"failed: {reason}"
        self.fail(study, reason, "no-pixels")
        return f"failed: {reason}"

    def open_task(self, study_id: str) -> dict[str, Any] | None:
        """The study's Task unless it has none or it is already completed: the Task a new
        report closes (in the report's own transaction)."""
        task = self.read(study_id)
        return None if task is None or task.get("status") == "completed" else task

    def complete(self, study: Mapping[str, Any]) -> None:
        """Close the study's open Task when its report was already there (written by an
        earlier run or another writer)."""
        task = self.open_task(study["id"])
        if task is not None:
            self.put(build_completed_task(task, reason=closing_reason(task)))

    def withdraw(self, study: Mapping[str, Any]) -> str:
        """Cancel the open Task of a withdrawn study; mark results of an entered-in-error one."""
        status = str(study.get("status"))
        reason = f"the study was withdrawn (ImagingStudy.status is {status!r}); not analysed"
        task = self.read(study["id"])
        if task is not None and task.get("status") in _OPEN:
            self.put(build_cancelled_task(task, reason))
        marked = 0
        if status == "entered-in-error":
            results = self._our_results(str(study["id"]))
            bundle = entered_in_error_transaction(str(study["id"]), results)
            if bundle["entry"]:
                self.fhir.transaction(bundle)
                marked = len(bundle["entry"])
        log.info("ImagingStudy/%s withdrawn (%s); %d results marked", study["id"], status, marked)
        return f"withdrawn: {status}" + (
            f", {marked} results marked entered-in-error" if marked else ""
        )

    def _our_results(self, study_id: str) -> list[dict[str, Any]]:
        """Every DiagnosticReport, Observation and heatmap Media of ours for the study, any
        model version (found by our identifier systems, so a radiologist's own Observation
        derived from ours is never touched)."""
        t = TERMINOLOGY
        study = f"ImagingStudy/{study_id}"
        observation_system = t.identifier_system("observation")
        report_system = t.identifier_system("report")
        observations = [
            o
            for o in self.fhir.search_all("Observation", {"derived-from": study})
            if any(i.get("system") == observation_system for i in o.get("identifier", []))
        ]
        reports = [
            r
            for r in self.fhir.search_all(
                "DiagnosticReport", {"result:Observation.derived-from": study}
            )
            if any(i.get("system") == report_system for i in r.get("identifier", []))
        ]
        media = [m for m in self.fhir.search_all("Media", {"part-of": study}) if is_cxr_overlay(m)]
        return [*reports, *observations, *media]
