"""Bulk-load NIH ChestX-ray14 metadata (and any subset of its images) into the FHIR server.

What one run does, and why it is safe to repeat, interrupt or run twice at once:

* **Read and validate** every row with its physical line number (header = line 1). Bad rows
  (unknown gender, age out of range, missing columns, a duplicate image index, a gender or
  follow-up number that contradicts an earlier row of the same patient) are *skipped with
  the reason* and listed in the report, never repaired or invented.
* **Batch** the valid rows into FHIR transactions of about ``batch_size`` studies, cut only
  between patients so one transaction holds each patient once. Every entry is a conditional
  create on an identifier (Patient: NIH patient id; ImagingStudy: image index; Media: image
  index), so a row that is already on the server is matched, not created again.
* **Concurrent runs** (two ``cxr ingest`` processes, or ``concurrency > 1`` batches that share
  a patient) cannot duplicate: HAPI stores each conditional create's match URL under a unique
  index (``HFJ_RES_SEARCH_URL``, hapi-fhir PR #4609, 2023; HAPI 8.8 here), so of two racing
  creates one commits and the other's whole transaction fails with 409 and is rolled back.
  That transaction is sent again (up to :data:`CONFLICT_RETRIES` times, jittered backoff);
  HAPI resolves every ``ifNoneExist`` afresh, so the retry *matches* what the winner created
  and reports it as already present. Updates of existing studies (activation, boxes) carry
  ``If-Match``, so two runs never overwrite each other's version either.
* **Resume**: the line ranges whose transaction committed are written to a small state file
  (``{ingest_state_dir}/nih-<metadata sha256>-<target>.json``) after every batch, under a file
  lock and merged with what another process wrote. A killed run restarts where it stopped; the
  worst case (killed between commit and state write) re-sends one batch per worker, which the
  conditional creates turn into "already present". A state file whose last committed study
  is missing on the server (HAPI was reset) is discarded with a warning.
* **Images**: a row whose ``<image index>`` is found under ``images`` gets a ``Media`` with
  the PNG *inline* (``content.data``) in the same transaction as its study, and the study is
  ``available``; rows without an image get a ``registered`` study (R4: "nothing yet
  available"), which the rest-hook Subscription (``status=available``) ignores. Inline, not
  Binary + ``content.url``: the study and its pixels commit atomically, so the worker that HAPI
  notifies always finds them, and the pipeline reads them without a second request. The cost is
  base64 (+33 %) in HAPI's resource table: ~0.6 MB per NIH PNG, ~56 GB for all 112,120 images
  (vs 42 GB of PNGs) — a Binary would be stored in the same database, so it saves only the
  base64 overhead. When images arrive for a study that was loaded earlier without them, the
  Media is added and the study is updated ``registered`` → ``available``, which notifies.
* **Bounding boxes** (``bbox``: NIH's ``BBox_List_2017.csv``): each image's boxes ride on its
  ImagingStudy as ``nih-bounding-box`` extensions (:func:`fhir_service.nih.bbox_extension`).
  A new study is created with them; a study already on the server (an earlier run without
  boxes, rows resumed from the state file) is read and updated only if its boxes differ, so a
  re-run adds missing boxes and otherwise writes nothing. Box lines that cannot be attached
  (unknown finding, image not among the rows, its row skipped or failed) are listed with
  line number and reason.
* **Bulk inference** (``process_studies``): studies that got their pixels are collected across
  batches and handed over ``inference_batch_size`` at a time, for one batched model pass.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxr_errors import CxrError, FhirError, FhirUnavailableError, InputError
from fhir_service import nih
from fhir_service.fhir_client import FhirClient
from fhir_service.nih import BadLine, BoundingBox, NihRecord

__all__ = [
    "BadLine",
    "IngestOptions",
    "IngestReport",
    "Progress",
    "Row",
    "build_batches",
    "build_transaction",
    "file_sha256",
    "ingest",
    "load_boxes",
    "read_rows",
]

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
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# --- reading and validating -----------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A valid metadata row and where it is in the file."""

    line: int
    rec: NihRecord


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_rows(path: Path, *, limit: int | None = None) -> Iterator[Row | BadLine]:
    """Every data row of ``path`` (Data_Entry_2017 or the sample manifest, plain or .gz).

    ``limit`` counts data rows read, bad ones included, so ``--limit 500`` always means the
    file's first 500 rows.
    """
    if not path.is_file():
        raise InputError(f"metadata file not found: {path}")
    with nih.open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path} is empty") from None
        columns = nih.header_columns(header)
        names = {name for name, _ in columns}
        if not names & {"Image Index", "file"}:
            raise InputError(
                f"{path}: line 1 is not an NIH header (no 'Image Index' column): {header[:4]}"
            )
        width = sum(span for _, span in columns)
        seen_image: dict[str, int] = {}
        patient_sex: dict[str, tuple[str, int]] = {}
        follow_ups: dict[tuple[str, int], int] = {}
        count = 0
        for cells in reader:
            if limit is not None and count >= limit:
                return
            line = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            count += 1
            yield _check_row(line, cells, columns, width, seen_image, patient_sex, follow_ups)


def _check_row(
    line: int,
    cells: list[str],
    columns: list[tuple[str, int]],
    width: int,
    seen_image: dict[str, int],
    patient_sex: dict[str, tuple[str, int]],
    follow_ups: dict[tuple[str, int], int],
) -> Row | BadLine:
    row: dict[str, str] = {}
    i = 0
    for name, span in columns:
        if i + span > len(cells):
            break  # a short row: parse_record names the first missing column it needs
        row[name] = ",".join(cells[i : i + span])
        i += span
    image_index = (row.get("Image Index") or row.get("file") or "").strip() or None
    if len(cells) > width:
        return BadLine(line, image_index, f"{len(cells)} fields, the header has {width}")
    try:
        rec = nih.parse_record(row)
    except InputError as exc:
        return BadLine(line, image_index, exc.message)
    first = seen_image.get(rec.image_index)
    if first is not None:
        return BadLine(line, rec.image_index, f"duplicate image index (first at line {first})")
    seen_image[rec.image_index] = line
    sex, sex_line = patient_sex.setdefault(rec.patient_id, (rec.sex, line))
    if sex != rec.sex:
        return BadLine(
            line,
            rec.image_index,
            f"gender {rec.sex} contradicts {sex} for patient {rec.patient_id} (line {sex_line})",
        )
    fu_line = follow_ups.setdefault((rec.patient_id, rec.follow_up), line)
    if fu_line != line:
        return BadLine(
            line,
            rec.image_index,
            f"follow-up #{rec.follow_up} of patient {rec.patient_id} already at line {fu_line}",
        )
    return Row(line, rec)


# --- batches and transactions ---------------------------------------------------------------


def build_batches(rows: Iterable[Row], batch_size: int) -> Iterator[list[Row]]:
    """Consecutive rows in batches of about ``batch_size``, cut between patients.

    NIH rows are grouped by patient (the image index starts with the patient id), so a cut
    between patients puts each patient in one batch and concurrent batches never race to
    create the same Patient. A patient with more rows than 4 × ``batch_size`` is split
    anyway (the conditional create keeps that correct, only slower).
    """
    batch: list[Row] = []
    for row in rows:
        if batch and (
            len(batch) >= 4 * batch_size
            or (len(batch) >= batch_size and row.rec.patient_id != batch[-1].rec.patient_id)
        ):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def _urn(kind: str, key: str) -> str:
    return f"urn:uuid:{uuid.uuid5(nih.DICOM_UID_ROOT, f'{kind}:{key}')}"


#: image index → its boxes, in file order
BoxIndex = dict[str, tuple[BoundingBox, ...]]


@dataclass(frozen=True)
class _Planned:
    """Which request entries belong to which row, to read the response back."""

    row: Row
    study_entry: int
    media_entry: int | None


def build_transaction(
    rows: list[Row],
    images: dict[str, bytes],
    boxes: BoxIndex | None = None,
) -> tuple[dict[str, Any], list[_Planned]]:
    """One transaction for ``rows``: each Patient once, then each study (with its boxes, and
    its Media) in follow-up order — the ``Follow-up #`` column, not the filename suffix, which
    differs for 24,106 NIH rows — so HAPI's ids and ``_lastUpdated`` follow the clinical
    order."""
    entries: list[dict[str, Any]] = []
    patients: set[str] = set()
    planned: list[_Planned] = []
    for row in sorted(rows, key=lambda r: (r.rec.patient_id, r.rec.follow_up)):
        rec = row.rec
        patient_urn = _urn("patient", rec.patient_id)
        if rec.patient_id not in patients:
            patients.add(rec.patient_id)
            entries.append(
                {
                    "fullUrl": patient_urn,
                    "resource": nih.patient_resource(rec),
                    "request": {
                        "method": "POST",
                        "url": "Patient",
                        "ifNoneExist": nih.patient_conditional(rec),
                    },
                }
            )
        image = images.get(rec.image_index)
        study_urn = _urn("study", rec.image_index)
        status = "available" if image is not None else "registered"
        entries.append(
            {
                "fullUrl": study_urn,
                "resource": nih.imaging_study_resource(
                    rec, patient_urn, status=status, boxes=(boxes or {}).get(rec.image_index, ())
                ),
                "request": {
                    "method": "POST",
                    "url": "ImagingStudy",
                    "ifNoneExist": nih.study_conditional(rec),
                },
            }
        )
        study_entry = len(entries) - 1
        media_entry: int | None = None
        if image is not None:
            entries.append(
                {
                    "fullUrl": _urn("media", rec.image_index),
                    "resource": nih.image_media_resource(rec, image, study_urn, patient_urn),
                    "request": {
                        "method": "POST",
                        "url": "Media",
                        "ifNoneExist": nih.media_conditional(rec),
                    },
                }
            )
            media_entry = len(entries) - 1
        planned.append(_Planned(row, study_entry, media_entry))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, planned


# --- resumable progress ---------------------------------------------------------------------


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _ranges(lines: Iterable[int]) -> list[tuple[int, int]]:
    return _merge((n, n) for n in lines)


class ProgressState:
    """Committed line ranges of one (metadata file, FHIR server, images dir), on disk.

    Several processes may share the file: every save takes an exclusive ``flock``, re-reads,
    merges and replaces it atomically, so no process loses another's progress.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.done: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def load(self) -> None:
        if self.path.is_file():
            self.done = _merge(tuple(r) for r in self._read().get("done", []))

    def _read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def contains(self, line: int) -> bool:
        # Few ranges (they merge as batches complete), so a scan is fine.
        return any(lo <= line <= hi for lo, hi in self.done)

    def last_line(self) -> int | None:
        return self.done[-1][1] if self.done else None

    def add(self, lines: Iterable[int]) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.path.with_suffix(".lock")
            with lock_path.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    on_disk = [tuple(r) for r in self._read().get("done", [])]
                    self.done = _merge([*self.done, *on_disk, *_ranges(lines)])
                    tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps({**self.meta, "done": self.done}))
                    tmp.replace(self.path)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def reset(self) -> None:
        self.done = []
        self.path.unlink(missing_ok=True)


# --- the run --------------------------------------------------------------------------------


@dataclass
class IngestOptions:
    metadata: Path
    state_dir: Path
    images: Path | None = None
    limit: int | None = None
    batch_size: int = 50
    concurrency: int = 2
    resume: bool = True
    max_image_bytes: int = 64 * 1024 * 1024
    bbox: Path | None = None
    """NIH's ``BBox_List_2017.csv(.gz)``; ``None`` loads no boxes and checks none"""
    inference_batch_size: int = 8
    """studies per ``process_studies`` call (one batched model pass)"""


@dataclass
class Progress:
    """Handed to the progress callback after every batch."""

    rows_total: int
    rows_done: int
    resources_written: int


@dataclass
class _Counts:
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

    def merge(self, other: _Counts) -> None:
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

    def add_change(self, change: _Change) -> None:
        self.activated += change.activated
        self.boxes_written += change.boxes_written
        self.boxes_present += change.boxes_present
        self.studies_boxed += change.boxes_written > 0


class _Races:
    """How often this run's threads lost a race to a concurrent writer and tried again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def lost(self) -> None:
        with self._lock:
            self.count += 1


@dataclass
class IngestReport:
    """What happened; :meth:`as_json` is the machine-readable report file."""

    metadata: str
    metadata_sha256: str
    fhir_base_url: str
    images: str | None
    started: str
    wall_s: float
    rows_read: int
    rows_valid: int
    rows_created: int
    """rows whose ImagingStudy this run created"""
    rows_already_present: int
    """rows whose ImagingStudy was already on the server (earlier run, concurrent run)"""
    rows_resumed: int
    """rows committed by an earlier, interrupted run (not sent again)"""
    rows_with_images: int
    studies_activated: int
    """existing ``registered`` studies whose image arrived in this run (now ``available``)"""
    created: dict[str, int]
    already_present: dict[str, int]
    skipped: list[BadLine]
    failed: list[BadLine]
    inference: dict[str, int]
    state_file: str
    conflicts_retried: int = 0
    """transactions and updates sent again after a concurrent writer won a race (409/412)"""
    bbox: str | None = None
    boxes_read: int = 0
    """box lines in the bounding-box file (valid or not)"""
    boxes_written: int = 0
    """boxes this run put on studies (new studies, or existing ones that lacked them)"""
    boxes_already_present: int = 0
    studies_boxes_updated: int = 0
    """existing studies updated because their boxes differed from the file"""
    boxes_skipped: list[BadLine] = field(default_factory=list)
    """box lines not attached, with the reason (boxes_read = written + present + skipped)"""

    @property
    def resources_written(self) -> int:
        return sum(self.created.values()) + sum(self.already_present.values())

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(_reason_kind(b.reason) for b in self.skipped).most_common())

    @property
    def boxes_skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(_box_reason_kind(b.reason) for b in self.boxes_skipped).most_common())

    def as_json(self) -> dict[str, Any]:
        return {
            "metadata": self.metadata,
            "metadata_sha256": self.metadata_sha256,
            "fhir_base_url": self.fhir_base_url,
            "images": self.images,
            "bbox": self.bbox,
            "started": self.started,
            "wall_s": round(self.wall_s, 3),
            "resources_per_s": round(self.resources_written / self.wall_s, 1)
            if self.wall_s
            else None,
            "rows": {
                "read": self.rows_read,
                "valid": self.rows_valid,
                "created": self.rows_created,
                "already_present": self.rows_already_present,
                "resumed": self.rows_resumed,
                "skipped": len(self.skipped),
                "failed": len(self.failed),
                "with_images": self.rows_with_images,
                "activated": self.studies_activated,
            },
            "created": self.created,
            "already_present": self.already_present,
            "conflicts_retried": self.conflicts_retried,
            "skipped_by_reason": self.skipped_by_reason,
            "skipped": [b.__dict__ for b in self.skipped],
            "failed": [b.__dict__ for b in self.failed],
            "boxes": {
                "read": self.boxes_read,
                "written": self.boxes_written,
                "already_present": self.boxes_already_present,
                "skipped": len(self.boxes_skipped),
                "studies_updated": self.studies_boxes_updated,
            },
            "boxes_skipped_by_reason": self.boxes_skipped_by_reason,
            "boxes_skipped": [b.__dict__ for b in self.boxes_skipped],
            "inference": self.inference,
            "state_file": self.state_file,
        }


def _reason_kind(reason: str) -> str:
    # "age 130 out of range 0..120" → "age out of range": group by the reason's wording.
    for kind in (
        "unknown gender",
        "out of range",
        "duplicate image index",
        "missing column",
        "contradicts",
        "follow-up #",
        "fields, the header has",
        "not an integer",
        "unknown view position",
        "bad number",
        "empty image index",
    ):
        if kind in reason:
            return kind
    return reason


_BOX_REASONS = (
    "unknown finding",
    "image not among the metadata rows read",
    "image index not in the metadata",
    "metadata row was skipped",
    "its row failed",
    "study is not on the server",
    "duplicate box",
    "outside the",
    "empty box",
    "finite",
    "bad number",
    "a box needs",
    "unexpected values",
    "empty image index",
)


def _box_reason_kind(reason: str) -> str:
    return next((kind for kind in _BOX_REASONS if kind in reason), reason)


def _image_index(folder: Path) -> dict[str, Path]:
    """File name → path for every image under ``folder`` (NIH ships images_001/images/…)."""
    found: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(_IMAGE_SUFFIXES):
                found.setdefault(name, Path(dirpath) / name)
    return found


def _state_for(options: IngestOptions, sha: str, base_url: str) -> ProgressState:
    images = str(options.images.resolve()) if options.images else ""
    # One state per (file, server, images dir): loading metadata alone and later with images
    # are different jobs, and so are two servers. Not per bbox file: boxes of resumed rows
    # are checked on the server instead (few), so adding boxes never re-sends 112k rows.
    target = hashlib.sha256(f"{base_url}\n{images}".encode()).hexdigest()[:12]
    path = options.state_dir / f"nih-{sha[:16]}-{target}.json"
    return ProgressState(
        path, {"metadata": str(options.metadata), "sha256": sha, "fhir": base_url, "images": images}
    )


def _state_is_live(fhir: FhirClient, state: ProgressState, rows: dict[int, NihRecord]) -> bool:
    """Does the server still hold the last study the state says was committed?"""
    last = state.last_line()
    if last is None:
        return True
    rec = rows.get(last)
    if rec is None:
        return True  # the line is beyond --limit or invalid now; nothing to check against
    found = fhir.count(
        "ImagingStudy", {"identifier": f"{nih.IMAGE_INDEX_SYSTEM}|{rec.image_index}"}
    )
    return found > 0


def load_boxes(
    path: Path, valid: list[Row], skipped: list[BadLine], limit: int | None
) -> tuple[BoxIndex, int, list[BadLine]]:
    """Boxes per image index of this run's rows, the number of box lines, and the lines that
    cannot be attached (bad lines, images without a valid row here) with the reason."""
    rows = {r.rec.image_index for r in valid}
    skipped_rows = {b.image_index: b for b in skipped if b.image_index}
    boxes: dict[str, list[BoundingBox]] = {}
    bad: list[BadLine] = []
    read = 0
    for item in nih.read_bboxes(path):
        read += 1
        if isinstance(item, BadLine):
            log.warning("box line %d (%s) skipped: %s", item.line, item.image_index, item.reason)
            bad.append(item)
        elif item.image_index in rows:
            boxes.setdefault(item.image_index, []).append(item)
        elif (row := skipped_rows.get(item.image_index)) is not None:
            reason = f"its metadata row was skipped (line {row.line}: {row.reason})"
            bad.append(BadLine(item.line, item.image_index, reason))
        elif limit is not None:
            reason = f"image not among the metadata rows read (--limit {limit})"
            bad.append(BadLine(item.line, item.image_index, reason))
        else:
            bad.append(BadLine(item.line, item.image_index, "image index not in the metadata"))
    return {k: tuple(v) for k, v in boxes.items()}, read, bad


ProcessStudies = Callable[[Sequence[tuple[str, str]]], list[str]]


class _Inference:
    """Studies with pixels, collected across committed batches and handed to
    ``process_studies`` ``batch_size`` at a time (the last call takes the rest)."""

    def __init__(self, process: ProcessStudies | None, batch_size: int) -> None:
        self.process = process
        self.batch_size = max(1, batch_size)
        self.pending: list[tuple[str, str]] = []
        self.outcomes: Counter[str] = Counter()

    def add(self, studies: list[tuple[str, str]]) -> None:
        if self.process is None:
            return
        self.pending.extend(studies)
        while len(self.pending) >= self.batch_size:
            self._run(self.batch_size)

    def flush(self) -> None:
        while self.pending:
            self._run(self.batch_size)

    def _run(self, n: int) -> None:
        assert self.process is not None
        batch, self.pending = self.pending[:n], self.pending[n:]
        outcomes = self.process(batch)
        if len(outcomes) != len(batch):
            raise CxrError(f"bulk inference returned {len(outcomes)} outcomes for {len(batch)}")
        for outcome in outcomes:
            self.outcomes[outcome.split(":")[0]] += 1


def ingest(
    fhir: FhirClient,
    options: IngestOptions,
    *,
    progress: Callable[[Progress], None] | None = None,
    process_studies: ProcessStudies | None = None,
    on_batch_committed: Callable[[int], None] | None = None,
) -> IngestReport:
    """Load the metadata (and images, and boxes) into ``fhir``; see the module docstring.

    ``process_studies([(study_id, version_id), …])`` (bulk inference) is called from this
    thread with up to ``options.inference_batch_size`` committed studies that have their image,
    and returns one outcome per study; ``on_batch_committed(n)`` after the n-th batch of this
    run is recorded (tests use it to interrupt a run half-way).
    """
    started = datetime.now(UTC)
    t0 = time.monotonic()
    sha = file_sha256(options.metadata)
    state = _state_for(options, sha, fhir.base_url)
    valid: list[Row] = []
    skipped: list[BadLine] = []
    for item in read_rows(options.metadata, limit=options.limit):
        (valid if isinstance(item, Row) else skipped).append(item)  # type: ignore[arg-type]
    rows_read = len(valid) + len(skipped)
    for bad in skipped:
        log.warning("line %d (%s) skipped: %s", bad.line, bad.image_index or "?", bad.reason)
    boxes: BoxIndex | None = None
    boxes_read = 0
    tally = _Counts()
    if options.bbox is not None:
        boxes, boxes_read, tally.bad_boxes = load_boxes(options.bbox, valid, skipped, options.limit)

    if options.resume:
        state.load()
        if not _state_is_live(fhir, state, {r.line: r.rec for r in valid}):
            log.warning(
                "progress in %s names studies that are not on %s (server reset?); starting over",
                state.path,
                fhir.base_url,
            )
            state.reset()
    else:
        state.reset()
    todo = [r for r in valid if not state.contains(r.line)]
    resumed = len(valid) - len(todo)
    races = _Races()
    if boxes:
        # Rows an earlier run committed are not sent again; their studies may predate boxes.
        done = [r for r in valid if state.contains(r.line) and r.rec.image_index in boxes]
        tally.merge(_boxes_on_committed(fhir, done, boxes, races))

    image_paths = _image_index(options.images) if options.images else {}
    with_images = sum(1 for r in valid if r.rec.image_index in image_paths)
    total = len(todo)
    done_rows = 0
    inference = _Inference(process_studies, options.inference_batch_size)

    def load_images(rows: list[Row]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for row in rows:
            path = image_paths.get(row.rec.image_index)
            if path is None:
                continue
            size = path.stat().st_size
            if size > options.max_image_bytes:
                raise InputError(f"{path} is {size} bytes; the limit is {options.max_image_bytes}")
            out[row.rec.image_index] = path.read_bytes()
        return out

    def run_batch(rows: list[Row]) -> _BatchResult:
        return _send_batch(fhir, rows, load_images, boxes, races)

    batches = build_batches(todo, max(1, options.batch_size))
    committed_batches = 0
    with ThreadPoolExecutor(max_workers=max(1, options.concurrency)) as pool:
        pending: set[Future[_BatchResult]] = set()
        # A bounded window: only ~2 batches per worker are built (and their images read) ahead.
        window = 2 * max(1, options.concurrency)
        exhausted = False
        try:
            while pending or not exhausted:
                while not exhausted and len(pending) < window:
                    batch = next(batches, None)
                    if batch is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(run_batch, batch))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    result = future.result()
                    tally.merge(result.counts)
                    if result.committed_lines:
                        state.add(result.committed_lines)
                    done_rows += len(result.rows)
                    committed_batches += 1
                    inference.add(result.image_studies)
                    if progress is not None:
                        progress(
                            Progress(
                                total,
                                done_rows,
                                sum(tally.created.values()) + sum(tally.present.values()),
                            )
                        )
                    if on_batch_committed is not None:
                        on_batch_committed(committed_batches)
            inference.flush()
        except BaseException:
            # Interrupted (Ctrl-C, a test hook): what committed is recorded; let in-flight
            # batches finish rather than abandon transactions whose outcome we never learn.
            for future in pending:
                future.cancel()
            if inference.pending:
                log.warning(
                    "%d committed studies were not run through bulk inference; the rest-hook "
                    "or `cxr reconcile` will process them",
                    len(inference.pending),
                )
            raise

    if boxes:
        for bad in tally.failed:
            for box in boxes.get(bad.image_index or "", ()):
                reason = f"not attached: its row failed (line {bad.line})"
                tally.bad_boxes.append(BadLine(box.line, box.image_index, reason))
    return IngestReport(
        metadata=str(options.metadata),
        metadata_sha256=sha,
        fhir_base_url=fhir.base_url,
        images=str(options.images) if options.images else None,
        started=started.isoformat(timespec="seconds"),
        wall_s=time.monotonic() - t0,
        rows_read=rows_read,
        rows_valid=len(valid),
        rows_created=tally.rows_created,
        rows_already_present=tally.rows_present,
        rows_resumed=resumed,
        rows_with_images=with_images,
        studies_activated=tally.activated,
        created=dict(sorted(tally.created.items())),
        already_present=dict(sorted(tally.present.items())),
        skipped=skipped,
        failed=tally.failed,
        inference=dict(inference.outcomes),
        state_file=str(state.path),
        conflicts_retried=races.count,
        bbox=str(options.bbox) if options.bbox else None,
        boxes_read=boxes_read,
        boxes_written=tally.boxes_written,
        boxes_already_present=tally.boxes_present,
        studies_boxes_updated=tally.studies_boxed,
        boxes_skipped=sorted(tally.bad_boxes, key=lambda b: b.line),
    )


@dataclass
class _BatchResult:
    rows: list[Row]
    committed_lines: list[int] = field(default_factory=list)
    counts: _Counts = field(default_factory=_Counts)
    image_studies: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: _BatchResult) -> None:
        self.committed_lines += other.committed_lines
        self.counts.merge(other.counts)
        self.image_studies += other.image_studies


def _send_batch(
    fhir: FhirClient,
    rows: list[Row],
    load_images: Callable[[list[Row]], dict[str, bytes]],
    boxes: BoxIndex | None,
    races: _Races,
) -> _BatchResult:
    try:
        return _commit(fhir, rows, load_images(rows), boxes, races)
    except CxrError as exc:
        if len(rows) == 1:
            result = _BatchResult(rows)
            result.counts.failed.append(BadLine(rows[0].line, rows[0].rec.image_index, exc.message))
            return result
        log.warning("batch of %d rows failed (%s); retrying row by row", len(rows), exc.message)
    # One bad row refuses the whole transaction: find it, and still load the others. (If the
    # batch did commit and a later step failed, the rows now match: nothing is created twice.)
    result = _BatchResult(rows)
    for row in rows:
        result.merge(_send_batch(fhir, [row], load_images, boxes, races))
    return result


def _backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (0-based) after a lost race: jittered, so two runs
    that collided do not collide again in lockstep."""
    return min(4.0, 0.25 * 2.0**attempt) * random.uniform(0.5, 1.5)


def _transaction_with_retry(
    fhir: FhirClient, bundle: dict[str, Any], races: _Races
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
    races: _Races,
) -> _BatchResult:
    bundle, planned = build_transaction(rows, images, boxes)
    response = _transaction_with_retry(fhir, bundle, races)
    answers = response.get("entry", [])
    result = _BatchResult(rows)
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
                change = _update_existing(
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
class _Change:
    """What :func:`_update_existing` did to one study."""

    version: str | None
    """the new version id, or None when the study was left as it was"""
    activated: bool
    boxes_written: int
    boxes_present: int


def _update_existing(
    fhir: FhirClient,
    study_id: str,
    *,
    activate: bool,
    boxes: tuple[BoundingBox, ...] | None,
    races: _Races,
    study: dict[str, Any] | None = None,
) -> _Change:
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
        add_boxes = boxes is not None and not nih.has_boxes(current, boxes)
        if add_boxes:
            wanted = nih.with_boxes(wanted, boxes or ())
        if not activated and not add_boxes:
            return _Change(None, False, 0, len(boxes or ()))
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
        return _Change(
            str(updated.get("meta", {}).get("versionId", "")),
            activated,
            written,
            len(boxes or ()) - written,
        )
    raise AssertionError("unreachable")


def _boxes_on_committed(
    fhir: FhirClient, rows: list[Row], boxes: BoxIndex, races: _Races
) -> _Counts:
    """Make the studies of already committed rows carry their boxes: one identifier search
    per :data:`_SEARCH_CHUNK` rows, and an update only where the boxes differ."""
    counts = _Counts()
    for start in range(0, len(rows), _SEARCH_CHUNK):
        chunk = rows[start : start + _SEARCH_CHUNK]
        values = ",".join(f"{nih.IMAGE_INDEX_SYSTEM}|{r.rec.image_index}" for r in chunk)
        found: dict[str, dict[str, Any]] = {}
        params = {"identifier": values, "_count": len(chunk)}
        for resource in fhir.search_all("ImagingStudy", params):
            for ident in resource.get("identifier", []):
                if ident.get("system") == nih.IMAGE_INDEX_SYSTEM:
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
            change = _update_existing(
                fhir, str(study["id"]), activate=False, boxes=row_boxes, races=races, study=study
            )
            counts.add_change(change)
    return counts
