"""The reconciliation sweep: whatever HAPI's rest-hook dropped, or arrived while we were down.

HAPI retries a failed delivery for only ~60 s and then drops it, so the hook alone cannot
promise that every study is processed. The sweep

* reads ``ImagingStudy?_lastUpdated=gt<watermark>`` and queues every available study that has
  neither a current report for this model nor a failed Task, and every withdrawn one (the job
  closes what is open);
* queues the studies whose wait for an image has run out (waiting Tasks past their deadline),
  so they fail with a reason;
* reads ``Media?_lastUpdated=gt<watermark>`` and queues the waiting or image-less failed
  studies those images belong to (a late image whose notification was dropped);
* queues, every sweep, the studies waiting for an image in the PACS (a STOW there notifies
  nobody), so that one that arrived is read within a sweep interval, not at the deadline.

The watermarks live in PostgreSQL and move only past what the sweep has handled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.identifiers import study_model_identifier, task_identifier
from fhir_service.fhir.results import is_cxr_overlay
from fhir_service.fhir.tasks import awaited_in_pacs, task_business_status, waiting_deadline
from fhir_service.fhir.terminology import TERMINOLOGY
from subscriptions.lifecycle import LIVE_REPORT_STATUSES

log = logging.getLogger(__name__)

WATERMARK = "imagingstudy-sweep"
MEDIA_WATERMARK = "media-sweep"
#: Re-read a little behind the watermark: HAPI's lastUpdated has millisecond precision and
#: a study committed in the same millisecond as the last one we saw must not be skipped.
#: Re-queuing is harmless (the job is idempotent).
OVERLAP = timedelta(seconds=2)

_DDL = """
CREATE TABLE IF NOT EXISTS cxr_watermarks (
    name text PRIMARY KEY,
    value timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


def read_watermark(dsn: str, name: str = WATERMARK) -> datetime | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_DDL)
        row = conn.execute("SELECT value FROM cxr_watermarks WHERE name = %s", (name,))
        found = row.fetchone()
    return found[0] if found else None


def write_watermark(dsn: str, value: datetime, name: str = WATERMARK) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_DDL)
        conn.execute(
            "INSERT INTO cxr_watermarks (name, value) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = GREATEST(cxr_watermarks.value, "
            "EXCLUDED.value), updated_at = now()",
            (name, value),
        )


@dataclass(frozen=True)
class SweepResult:
    seen: int
    queued: int
    reported: int
    failed: int
    watermark: datetime | None
    expired: int = 0
    """studies queued because their wait for an image ran out"""
    late_images: int = 0
    """studies queued because an image arrived for them (waiting or failed without one)"""
    pacs_rechecks: int = 0
    """waiting studies queued to look for their image in the PACS again"""


def sweep(
    fhir: FhirClient,
    dsn: str,
    model_version: str,
    enqueue: Callable[[str, str], bool],
    *,
    since: datetime | None = None,
    now: datetime | None = None,
) -> SweepResult:
    """Queue what has no result; ``since`` overrides the stored watermarks."""
    start = since if since is not None else read_watermark(dsn)
    params: dict[str, str] = {
        "status": "available,cancelled,entered-in-error",
        "_sort": "_lastUpdated",
        "_count": "200",
    }
    if start is not None:
        params["_lastUpdated"] = f"gt{(start - OVERLAP).isoformat()}"
    seen = queued = reported = failed = 0
    newest: datetime | None = None
    for study in fhir.search_all("ImagingStudy", params):
        seen += 1
        sid = study["id"]
        updated = datetime.fromisoformat(study["meta"]["lastUpdated"])
        newest = updated if newest is None or updated > newest else newest
        if study.get("status") == "available":
            system, value = study_model_identifier(sid, model_version)
            live = {"identifier": f"{system}|{value}", "status": ",".join(LIVE_REPORT_STATUSES)}
            if fhir.count("DiagnosticReport", live):
                reported += 1
                continue
            tsys, tval = task_identifier(sid)
            if fhir.count("Task", {"identifier": f"{tsys}|{tval}", "status": "failed"}):
                failed += 1
                continue
        if enqueue(sid, str(study["meta"]["versionId"])):
            queued += 1
    if newest is not None:
        write_watermark(dsn, newest)
    open_tasks = _open_image_tasks(fhir)
    expired = _queue_expired_waits(open_tasks, enqueue, now or datetime.now(UTC))
    late = _queue_late_images(fhir, dsn, open_tasks, enqueue, since)
    rechecks = queue_pacs_rechecks(open_tasks, enqueue)
    log.info(
        "sweep: %d seen, %d queued, %d reported, %d failed; %d waits expired, %d late images, "
        "%d PACS rechecks",
        seen, queued, reported, failed, expired, late, rechecks,
    )  # fmt: skip
    return SweepResult(seen, queued, reported, failed, newest or start, expired, late, rechecks)


def _open_image_tasks(fhir: FhirClient) -> dict[str, dict[str, Any]]:
    """study id → its Task, for studies waiting for an image or failed for want of one."""
    system = TERMINOLOGY.identifier_system("task")
    out: dict[str, dict[str, Any]] = {}
    for task in fhir.search_all(
        "Task", {"identifier": f"{system}|", "status": "on-hold,failed", "_count": "200"}
    ):
        waiting = waiting_deadline(task) is not None
        if waiting or task_business_status(task) == "no-pixels":
            focus = str((task.get("focus") or {}).get("reference") or "")
            if focus.startswith("ImagingStudy/"):
                out[focus.split("/")[1]] = task
    return out


def _queue_expired_waits(
    open_tasks: dict[str, dict[str, Any]], enqueue: Callable[[str, str], bool], now: datetime
) -> int:
    queued = 0
    for study_id, task in open_tasks.items():
        deadline = waiting_deadline(task)
        if deadline is not None and deadline <= now and enqueue(study_id, "wait-expired"):
            queued += 1
    return queued


def queue_pacs_rechecks(
    open_tasks: dict[str, dict[str, Any]], enqueue: Callable[[str, str], bool]
) -> int:
    """Queue the studies waiting for their image in the PACS: no notification comes from
    there, so each sweep looks again (the job only writes when the answer changed)."""
    return sum(
        1
        for study_id, task in sorted(open_tasks.items())
        if awaited_in_pacs(task) and enqueue(study_id, "pacs-recheck")
    )


def _queue_late_images(
    fhir: FhirClient,
    dsn: str,
    open_tasks: dict[str, dict[str, Any]],
    enqueue: Callable[[str, str], bool],
    since: datetime | None,
) -> int:
    """Queue waiting / image-less studies that an image arrived for since the last sweep."""
    start = since if since is not None else read_watermark(dsn, MEDIA_WATERMARK)
    # Only what is needed: heatmaps carry their PNG inline.
    params = {"_sort": "_lastUpdated", "_count": "200", "_elements": "partOf,identifier"}
    if start is not None:
        params["_lastUpdated"] = f"gt{(start - OVERLAP).isoformat()}"
    newest: datetime | None = None
    wanted: set[str] = set()
    for media in fhir.search_all("Media", params):
        updated = datetime.fromisoformat(media["meta"]["lastUpdated"])
        newest = updated if newest is None or updated > newest else newest
        if is_cxr_overlay(media):
            continue
        for part in media.get("partOf", []):
            kind, _, rest = str(part.get("reference") or "").partition("/")
            if kind == "ImagingStudy" and rest.split("/")[0] in open_tasks:
                wanted.add(rest.split("/")[0])
    if newest is not None:
        write_watermark(dsn, newest, MEDIA_WATERMARK)
    return sum(1 for sid in sorted(wanted) if enqueue(sid, "late-image"))
