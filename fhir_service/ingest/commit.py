"""Sending batches: one transaction per batch, retried on transient errors and on lost races,
row by row when one row spoils the batch; existing studies brought up to date."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cxr_errors import CxrError, FhirError, FhirUnavailableError
from fhir_service.fhir.client import FhirClient
from fhir_service.ingest.nih import BadLine, BoundingBox
from fhir_service.ingest.rows import Row
from fhir_service.ingest.transaction import (
    IMAGE_INDEX_SYSTEM,
    BoxIndex,
    build_transaction,
    has_boxes,
    with_boxes,
)

log = logging.getLogger(__name__)

#: How often a batch that HAPI answered with 5xx / timeout is retried before its rows are
#: tried one by one (and then reported as failed).
RETRIES = 3


#: How often a transaction that lost a race (409/412 from a concurrent run's conditional
#: create or update of the same identifier) is sent again; each retry re-resolves every
#: conditional create, so it matches what the winner wrote.
CONFLICT_RETRIES = 6


#: Identifiers per ``identifier=a,b,…`` search when boxes are checked on existing studies.
_SEARCH_CHUNK = 50


@dataclass
class Counts:
    """What a batch (or the run so far) did; batch counts are merged into the run's."""

    created: Counter[str] = field(default_factory=Counter)
    present: Counter[str] = field(default_factory=Counter)
    rows_created: int = 0
    rows_present: int = 0
    activated: int = 0
    boxes_written: int = 0
    boxes_present: int = 0
    studies_boxed: int = 0
    failed: list[BadLine] = field(default_factory=list)
    bad_boxes: list[BadLine] = field(default_factory=list)

    def merge(self, other: Counts) -> None:
        self.created.update(other.created)
        self.present.update(other.present)
        self.rows_created += other.rows_created
        self.rows_present += other.rows_present
        self.activated += other.activated
        self.boxes_written += other.boxes_written
        self.boxes_present += other.boxes_present
        self.studies_boxed += other.studies_boxed
        self.failed.extend(other.failed)
        self.bad_boxes.extend(other.bad_boxes)

    def add_change(self, change: Change) -> None:
        self.activated += change.activated
        self.boxes_written += change.boxes_written
        self.boxes_present += change.boxes_present
        self.studies_boxed += change.boxes_written > 0


class Races:
    """How often this run's threads lost a race to a concurrent writer and tried again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def lost(self) -> None:
        with self._lock:
            self.count += 1


@dataclass
class BatchResult:
    rows: list[Row]
    committed_lines: list[int] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    image_studies: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: BatchResult) -> None:
        self.committed_lines += other.committed_lines
        self.counts.merge(other.counts)
        self.image_studies += other.image_studies


def send_batch(
    fhir: FhirClient,
    rows: list[Row],
    load_images: Callable[[list[Row]], dict[str, bytes]],
    boxes: BoxIndex | None,
    races: Races,
) -> BatchResult:
    try:
        return _commit(fhir, rows, load_images(rows), boxes, races)
    except CxrError as exc:
        if len(rows) == 1:
            result = BatchResult(rows)
            result.counts.failed.append(BadLine(rows[0].line, rows[0].rec.image_index, exc.message))
            return result
        log.warning("batch of %d rows failed (%s); retrying row by row", len(rows), exc.message)
    # One bad row refuses the whole transaction: find it, and still load the others. (If the
    # batch did commit and a later step failed, the rows now match: nothing is created twice.)
    result = BatchResult(rows)
    for row in rows:
        result.merge(send_batch(fhir, [row], load_images, boxes, races))
    return result


def _backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (0-based) after a lost race: jittered, so two runs
    that collided do not collide again in lockstep."""
    return min(4.0, 0.25 * 2.0**attempt) * random.uniform(0.5, 1.5)


def _transaction_with_retry(
    fhir: FhirClient, bundle: dict[str, Any], races: Races
) -> dict[str, Any]:
    transient = conflicts = 0
    while True:
        try:
            return fhir.transaction(bundle)
        except FhirUnavailableError:
            transient += 1
            if transient > RETRIES:
                raise
            delay = 0.5 * 2 ** (transient - 1)
        except FhirError as exc:
            # 409/412: a concurrent conditional create of the same identifier won the race
            # (HAPI's unique match-URL index) and HAPI rolled this transaction back whole.
            # Sent again, every ifNoneExist is resolved afresh and matches the winner's.
            if exc.http_status not in (409, 412):
                raise
            conflicts += 1
            if conflicts > CONFLICT_RETRIES:
                raise
            races.lost()
            log.debug("transaction lost a race to a concurrent writer; sending it again")
            delay = _backoff(conflicts - 1)
        time.sleep(delay)


def _commit(
    fhir: FhirClient,
    rows: list[Row],
    images: dict[str, bytes],
    boxes: BoxIndex | None,
    races: Races,
) -> BatchResult:
    bundle, planned = build_transaction(rows, images, boxes)
    response = _transaction_with_retry(fhir, bundle, races)
    answers = response.get("entry", [])
    result = BatchResult(rows)
    counts = result.counts
    for i, entry in enumerate(bundle["entry"]):
        status = str(answers[i].get("response", {}).get("status", "")) if i < len(answers) else ""
        kind = entry["resource"]["resourceType"]
        (counts.created if status.startswith("201") else counts.present)[kind] += 1
    for plan in planned:
        row_boxes = boxes.get(plan.row.rec.image_index) if boxes is not None else None
        study = answers[plan.study_entry].get("response", {})
        study_id, version = _location(study.get("location", ""))
        if str(study.get("status", "")).startswith("201"):
            counts.rows_created += 1
            counts.boxes_written += len(row_boxes or ())
        else:
            counts.rows_present += 1
            if plan.media_entry is not None or row_boxes:
                change = update_existing(
                    fhir,
                    study_id,
                    activate=plan.media_entry is not None,
                    boxes=row_boxes,
                    races=races,
                )
                counts.add_change(change)
                version = change.version or version
        if plan.media_entry is not None:
            result.image_studies.append((study_id, version))
    result.committed_lines.extend(r.line for r in rows)
    return result


def _location(location: str) -> tuple[str, str]:
    # "ImagingStudy/123/_history/1"
    parts = location.split("/")
    study_id = parts[1] if len(parts) > 1 else ""
    version = parts[3] if len(parts) > 3 else ""
    return study_id, version


@dataclass(frozen=True)
class Change:
    """What :func:`update_existing` did to one study."""

    version: str | None
    """the new version id, or None when the study was left as it was"""
    activated: bool
    boxes_written: int
    boxes_present: int


def update_existing(
    fhir: FhirClient,
    study_id: str,
    *,
    activate: bool,
    boxes: tuple[BoundingBox, ...] | None,
    races: Races,
    study: dict[str, Any] | None = None,
) -> Change:
    """Bring a study that was already on the server up to date, in at most one update.

    ``activate``: its pixels are now there, so a ``registered`` study becomes ``available``
    (the update is what wakes the rest-hook; the Media committed first, so the worker finds
    the pixels). ``boxes``: the study must carry exactly these boxes (None: not checked).
    The update carries ``If-Match``: if a concurrent run changed the study first, it is read
    again and the decision made again, usually "nothing left to do".
    """
    for attempt in range(CONFLICT_RETRIES + 1):
        current = study if study is not None else fhir.read("ImagingStudy", study_id)
        study = None
        wanted = dict(current)
        activated = activate and current.get("status") == "registered"
        if activated:
            wanted["status"] = "available"
        add_boxes = boxes is not None and not has_boxes(current, boxes)
        if add_boxes:
            wanted = with_boxes(wanted, boxes or ())
        if not activated and not add_boxes:
            return Change(None, False, 0, len(boxes or ()))
        version = str(current.get("meta", {}).get("versionId", "")) or None
        try:
            updated = fhir.update(wanted, if_match=version)
        except FhirError as exc:
            if exc.http_status not in (409, 412) or attempt == CONFLICT_RETRIES:
                raise
            races.lost()
            time.sleep(_backoff(attempt))
            continue
        written = len(boxes or ()) if add_boxes else 0
        return Change(
            str(updated.get("meta", {}).get("versionId", "")),
            activated,
            written,
            len(boxes or ()) - written,
        )
    raise AssertionError("unreachable")


def boxes_on_committed(fhir: FhirClient, rows: list[Row], boxes: BoxIndex, races: Races) -> Counts:
    """Make the studies of already committed rows carry their boxes: one identifier search
    per :data:`_SEARCH_CHUNK` rows, and an update only where the boxes differ."""
    counts = Counts()
    for start in range(0, len(rows), _SEARCH_CHUNK):
        chunk = rows[start : start + _SEARCH_CHUNK]
        values = ",".join(f"{IMAGE_INDEX_SYSTEM}|{r.rec.image_index}" for r in chunk)
        found: dict[str, dict[str, Any]] = {}
        params = {"identifier": values, "_count": len(chunk)}
        for resource in fhir.search_all("ImagingStudy", params):
            for ident in resource.get("identifier", []):
                if ident.get("system") == IMAGE_INDEX_SYSTEM:
                    found[str(ident.get("value"))] = resource
        for row in chunk:
            row_boxes = boxes[row.rec.image_index]
            study = found.get(row.rec.image_index)
            if study is None:
                reason = (
                    f"not attached: the progress file says line {row.line} was loaded, but its "
                    "study is not on the server (run with --restart)"
                )
                counts.bad_boxes += [BadLine(b.line, b.image_index, reason) for b in row_boxes]
                continue
            change = update_existing(
                fhir, str(study["id"]), activate=False, boxes=row_boxes, races=races, study=study
            )
            counts.add_change(change)
    return counts
