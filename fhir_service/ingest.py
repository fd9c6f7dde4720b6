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
  creates one commits and the other fails with 409; that batch is retried and then *matches*
  what the winner created.
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
"""

from __future__ import annotations

import csv
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from cxr_errors import CxrError, FhirError, FhirUnavailableError, InputError
from fhir_service import nih
from fhir_service.fhir_client import FhirClient
from fhir_service.nih import NihRecord

__all__ = [
    "BadRow",
    "IngestOptions",
    "IngestReport",
    "Progress",
    "Row",
    "build_batches",
    "build_transaction",
    "file_sha256",
    "ingest",
    "read_rows",
]

log = logging.getLogger(__name__)

#: How often a batch that HAPI answered with 5xx / timeout / conflict is retried before its
#: rows are tried one by one (and then reported as failed).
RETRIES = 3
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# --- reading and validating -----------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A valid metadata row and where it is in the file."""

    line: int
    rec: NihRecord


@dataclass(frozen=True)
class BadRow:
    """A row that was skipped, with the reason."""

    line: int
    image_index: str | None
    reason: str


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_rows(path: Path, *, limit: int | None = None) -> Iterator[Row | BadRow]:
    """Every data row of ``path`` (Data_Entry_2017 or the sample manifest, plain or .gz).

    ``limit`` counts data rows read, bad ones included, so ``--limit 500`` always means the
    file's first 500 rows.
    """
    if not path.is_file():
        raise InputError(f"metadata file not found: {path}")
    with _open_text(path) as fh:
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
) -> Row | BadRow:
    row: dict[str, str] = {}
    i = 0
    for name, span in columns:
        if i + span > len(cells):
            break  # a short row: parse_record names the first missing column it needs
        row[name] = ",".join(cells[i : i + span])
        i += span
    image_index = (row.get("Image Index") or row.get("file") or "").strip() or None
    if len(cells) > width:
        return BadRow(line, image_index, f"{len(cells)} fields, the header has {width}")
    try:
        rec = nih.parse_record(row)
    except InputError as exc:
        return BadRow(line, image_index, exc.message)
    first = seen_image.get(rec.image_index)
    if first is not None:
        return BadRow(line, rec.image_index, f"duplicate image index (first at line {first})")
    seen_image[rec.image_index] = line
    sex, sex_line = patient_sex.setdefault(rec.patient_id, (rec.sex, line))
    if sex != rec.sex:
        return BadRow(
            line,
            rec.image_index,
            f"gender {rec.sex} contradicts {sex} for patient {rec.patient_id} (line {sex_line})",
        )
    fu_line = follow_ups.setdefault((rec.patient_id, rec.follow_up), line)
    if fu_line != line:
        return BadRow(
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


@dataclass(frozen=True)
class _Planned:
    """Which request entries belong to which row, to read the response back."""

    row: Row
    study_entry: int
    media_entry: int | None


def build_transaction(
    rows: list[Row], images: dict[str, bytes]
) -> tuple[dict[str, Any], list[_Planned]]:
    """One transaction for ``rows``: each Patient once, then each study (and Media) in
    follow-up order — the ``Follow-up #`` column, not the filename suffix, which differs for
    24,106 NIH rows — so HAPI's ids and ``_lastUpdated`` follow the clinical order."""
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
                "resource": nih.imaging_study_resource(rec, patient_urn, status=status),
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


@dataclass
class Progress:
    """Handed to the progress callback after every batch."""

    rows_total: int
    rows_done: int
    resources_written: int


@dataclass
class _Tally:
    created: Counter[str] = field(default_factory=Counter)
    present: Counter[str] = field(default_factory=Counter)
    rows_created: int = 0
    rows_present: int = 0
    activated: int = 0
    failed: list[BadRow] = field(default_factory=list)
    inference: Counter[str] = field(default_factory=Counter)


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
    skipped: list[BadRow]
    failed: list[BadRow]
    inference: dict[str, int]
    state_file: str

    @property
    def resources_written(self) -> int:
        return sum(self.created.values()) + sum(self.already_present.values())

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(_reason_kind(b.reason) for b in self.skipped).most_common())

    def as_json(self) -> dict[str, Any]:
        return {
            "metadata": self.metadata,
            "metadata_sha256": self.metadata_sha256,
            "fhir_base_url": self.fhir_base_url,
            "images": self.images,
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
            "skipped_by_reason": self.skipped_by_reason,
            "skipped": [b.__dict__ for b in self.skipped],
            "failed": [b.__dict__ for b in self.failed],
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
    # are different jobs, and so are two servers.
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


ProcessStudy = Callable[[str, str], str]


def ingest(
    fhir: FhirClient,
    options: IngestOptions,
    *,
    progress: Callable[[Progress], None] | None = None,
    process_study: ProcessStudy | None = None,
    on_batch_committed: Callable[[int], None] | None = None,
) -> IngestReport:
    """Load the metadata (and images) into ``fhir``; see the module docstring.

    ``process_study(study_id, version_id)`` (bulk inference) is called for every study of a
    committed batch that has its image, from this thread; ``on_batch_committed(n)`` after the
    n-th batch of this run is recorded (tests use it to interrupt a run half-way).
    """
    started = datetime.now(UTC)
    t0 = time.monotonic()
    sha = file_sha256(options.metadata)
    state = _state_for(options, sha, fhir.base_url)
    valid: list[Row] = []
    skipped: list[BadRow] = []
    for item in read_rows(options.metadata, limit=options.limit):
        (valid if isinstance(item, Row) else skipped).append(item)  # type: ignore[arg-type]
    rows_read = len(valid) + len(skipped)
    for bad in skipped:
        log.warning("line %d (%s) skipped: %s", bad.line, bad.image_index or "?", bad.reason)

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

    image_paths = _image_index(options.images) if options.images else {}
    with_images = sum(1 for r in valid if r.rec.image_index in image_paths)
    tally = _Tally()
    total = len(todo)
    done_rows = 0

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
        return _send_batch(fhir, rows, load_images)

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
                    result.apply(tally)
                    if result.committed_lines:
                        state.add(result.committed_lines)
                    done_rows += len(result.rows)
                    committed_batches += 1
                    if process_study is not None:
                        for study_id, version in result.image_studies:
                            outcome = process_study(study_id, version)
                            tally.inference[outcome.split(":")[0]] += 1
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
        except BaseException:
            # Interrupted (Ctrl-C, a test hook): what committed is recorded; let in-flight
            # batches finish rather than abandon transactions whose outcome we never learn.
            for future in pending:
                future.cancel()
            raise

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
        inference=dict(tally.inference),
        state_file=str(state.path),
    )


@dataclass
class _BatchResult:
    rows: list[Row]
    committed_lines: list[int] = field(default_factory=list)
    created: Counter[str] = field(default_factory=Counter)
    present: Counter[str] = field(default_factory=Counter)
    rows_created: int = 0
    rows_present: int = 0
    activated: int = 0
    failed: list[BadRow] = field(default_factory=list)
    image_studies: list[tuple[str, str]] = field(default_factory=list)

    def apply(self, tally: _Tally) -> None:
        tally.created.update(self.created)
        tally.present.update(self.present)
        tally.rows_created += self.rows_created
        tally.rows_present += self.rows_present
        tally.activated += self.activated
        tally.failed.extend(self.failed)


def _send_batch(
    fhir: FhirClient, rows: list[Row], load_images: Callable[[list[Row]], dict[str, bytes]]
) -> _BatchResult:
    result = _BatchResult(rows)
    try:
        images = load_images(rows)
        _commit(fhir, rows, images, result)
        return result
    except CxrError as exc:
        if len(rows) == 1:
            result.failed.append(BadRow(rows[0].line, rows[0].rec.image_index, exc.message))
            return result
        log.warning("batch of %d rows failed (%s); retrying row by row", len(rows), exc.message)
    # One bad row refuses the whole transaction: find it, and still load the others.
    for row in rows:
        sub = _send_batch(fhir, [row], load_images)
        result.committed_lines += sub.committed_lines
        result.created.update(sub.created)
        result.present.update(sub.present)
        result.rows_created += sub.rows_created
        result.rows_present += sub.rows_present
        result.activated += sub.activated
        result.failed += sub.failed
        result.image_studies += sub.image_studies
    return result


def _transaction_with_retry(fhir: FhirClient, bundle: dict[str, Any]) -> dict[str, Any]:
    for attempt in range(RETRIES + 1):
        try:
            return fhir.transaction(bundle)
        except FhirUnavailableError:
            if attempt == RETRIES:
                raise
        except FhirError as exc:
            # 409/412: a concurrent conditional create of the same identifier won the race
            # (HAPI's unique match-URL index); the retry will match what it created.
            if getattr(exc, "http_status", None) not in (409, 412) or attempt == RETRIES:
                raise
        time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _commit(
    fhir: FhirClient, rows: list[Row], images: dict[str, bytes], result: _BatchResult
) -> None:
    bundle, planned = build_transaction(rows, images)
    response = _transaction_with_retry(fhir, bundle)
    answers = response.get("entry", [])
    for i, entry in enumerate(bundle["entry"]):
        status = str(answers[i].get("response", {}).get("status", "")) if i < len(answers) else ""
        kind = entry["resource"]["resourceType"]
        (result.created if status.startswith("201") else result.present)[kind] += 1
    for plan in planned:
        study = answers[plan.study_entry].get("response", {})
        created = str(study.get("status", "")).startswith("201")
        if created:
            result.rows_created += 1
        else:
            result.rows_present += 1
        if plan.media_entry is None:
            continue
        study_id, version = _location(study.get("location", ""))
        if not created:
            new_version = _activate(fhir, study_id)
            if new_version is not None:
                version = new_version
                result.activated += 1
        result.image_studies.append((study_id, version))
    result.committed_lines.extend(r.line for r in rows)


def _location(location: str) -> tuple[str, str]:
    # "ImagingStudy/123/_history/1"
    parts = location.split("/")
    study_id = parts[1] if len(parts) > 1 else ""
    version = parts[3] if len(parts) > 3 else ""
    return study_id, version


def _activate(fhir: FhirClient, study_id: str) -> str | None:
    """An existing ``registered`` study now has its pixels: make it ``available``.

    The update is what wakes the rest-hook (the Subscription matches ``status=available``);
    the Media committed first, so the worker it notifies finds the pixels.
    """
    study = fhir.read("ImagingStudy", study_id)
    if study.get("status") != "registered":
        return None
    study["status"] = "available"
    updated = fhir.update(study)
    return str(updated.get("meta", {}).get("versionId", ""))
