"""The reconciliation sweep: whatever HAPI's rest-hook dropped, or arrived while we were down.

HAPI retries a failed delivery for only ~60 s and then drops it, so the hook alone cannot
promise that every study is processed. The sweep reads
``ImagingStudy?_lastUpdated=gt<watermark>`` and queues every available study that has
neither a current report for this model nor a failed Task. The watermark lives in
PostgreSQL and moves only past studies the sweep has handled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.identifiers import study_model_identifier, task_identifier

log = logging.getLogger(__name__)

WATERMARK = "imagingstudy-sweep"
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


def read_watermark(dsn: str) -> datetime | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_DDL)
        row = conn.execute("SELECT value FROM cxr_watermarks WHERE name = %s", (WATERMARK,))
        found = row.fetchone()
    return found[0] if found else None


def write_watermark(dsn: str, value: datetime) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_DDL)
        conn.execute(
            "INSERT INTO cxr_watermarks (name, value) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = GREATEST(cxr_watermarks.value, "
            "EXCLUDED.value), updated_at = now()",
            (WATERMARK, value),
        )


@dataclass(frozen=True)
class SweepResult:
    seen: int
    queued: int
    reported: int
    failed: int
    watermark: datetime | None


def sweep(
    fhir: FhirClient,
    dsn: str,
    model_version: str,
    enqueue: Callable[[str, str], bool],
    *,
    since: datetime | None = None,
) -> SweepResult:
    """Queue what has no result; ``since`` overrides the stored watermark."""
    start = since if since is not None else read_watermark(dsn)
    params: dict[str, str] = {"status": "available", "_sort": "_lastUpdated", "_count": "200"}
    if start is not None:
        params["_lastUpdated"] = f"gt{(start - OVERLAP).isoformat()}"
    seen = queued = reported = failed = 0
    newest: datetime | None = None
    for study in fhir.search_all("ImagingStudy", params):
        seen += 1
        sid = study["id"]
        updated = datetime.fromisoformat(study["meta"]["lastUpdated"])
        newest = updated if newest is None or updated > newest else newest
        system, value = study_model_identifier(sid, model_version)
        if fhir.count("DiagnosticReport", {"identifier": f"{system}|{value}"}):
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
    log.info("sweep: %d seen, %d queued, %d reported, %d failed", seen, queued, reported, failed)
    return SweepResult(seen, queued, reported, failed, newest or start)
