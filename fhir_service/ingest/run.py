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
  ImagingStudy as ``nih-bounding-box`` extensions
  (:func:`fhir_service.ingest.transaction.bbox_extension`).
  A new study is created with them; a study already on the server (an earlier run without
  boxes, rows resumed from the state file) is read and updated only if its boxes differ, so a
  re-run adds missing boxes and otherwise writes nothing. Box lines that cannot be attached
  (unknown finding, image not among the rows, its row skipped or failed) are listed with
  line number and reason.
* **Bulk inference** (``process_studies``): studies that got their pixels are collected across
  batches and handed over ``inference_batch_size`` at a time, for one batched model pass.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cxr_errors import CxrError, InputError
from fhir_service.fhir.client import FhirClient
from fhir_service.ingest import nih
from fhir_service.ingest.commit import (
    BatchResult,
    Counts,
    Races,
    boxes_on_committed,
    send_batch,
)
from fhir_service.ingest.nih import BadLine, BoundingBox
from fhir_service.ingest.report import IngestReport
from fhir_service.ingest.rows import Row, build_batches, file_sha256, read_rows
from fhir_service.ingest.state import state_for, state_is_live
from fhir_service.ingest.transaction import BoxIndex

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


def _image_index(folder: Path) -> dict[str, Path]:
    """File name → path for every image under ``folder`` (NIH ships images_001/images/…)."""
    found: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(_IMAGE_SUFFIXES):
                found.setdefault(name, Path(dirpath) / name)
    return found


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
    run = _Run(fhir, options, progress, on_batch_committed)
    run.prepare()
    inference = _Inference(process_studies, options.inference_batch_size)
    try:
        run.send_all(inference.add)
        inference.flush()
    except BaseException:
        if inference.pending:
            log.warning(
                "%d committed studies were not run through bulk inference; the rest-hook "
                "or `cxr reconcile` will process them",
                len(inference.pending),
            )
        raise
    return run.report(dict(inference.outcomes))


class _Run:
    """One ingest run: its rows, progress file, counts and the batches in flight."""

    def __init__(
        self,
        fhir: FhirClient,
        options: IngestOptions,
        progress: Callable[[Progress], None] | None,
        on_batch_committed: Callable[[int], None] | None,
    ) -> None:
        self.fhir = fhir
        self.options = options
        self.progress = progress
        self.on_batch_committed = on_batch_committed
        self.started = datetime.now(UTC)
        self.t0 = time.monotonic()
        self.sha = file_sha256(options.metadata)
        self.state = state_for(
            options.state_dir, options.metadata, options.images, self.sha, fhir.base_url
        )
        self.valid: list[Row] = []
        self.skipped: list[BadLine] = []
        self.boxes: BoxIndex | None = None
        self.boxes_read = 0
        self.tally = Counts()
        self.races = Races()
        self.todo: list[Row] = []
        self.image_paths: dict[str, Path] = {}
        self.done_rows = 0
        self.committed_batches = 0

    def prepare(self) -> None:
        """Read and check the rows and boxes, pick up earlier progress, find the images."""
        options = self.options
        for item in read_rows(options.metadata, limit=options.limit):
            (self.valid if isinstance(item, Row) else self.skipped).append(item)  # type: ignore[arg-type]
        for bad in self.skipped:
            log.warning("line %d (%s) skipped: %s", bad.line, bad.image_index or "?", bad.reason)
        if options.bbox is not None:
            self.boxes, self.boxes_read, self.tally.bad_boxes = load_boxes(
                options.bbox, self.valid, self.skipped, options.limit
            )
        self._resume()
        self.todo = [r for r in self.valid if not self.state.contains(r.line)]
        if self.boxes:
            # Rows an earlier run committed are not sent again; their studies may predate boxes.
            done = [
                r
                for r in self.valid
                if self.state.contains(r.line) and r.rec.image_index in self.boxes
            ]
            self.tally.merge(boxes_on_committed(self.fhir, done, self.boxes, self.races))
        self.image_paths = _image_index(options.images) if options.images else {}

    def _resume(self) -> None:
        state = self.state
        if not self.options.resume:
            state.reset()
            return
        state.load()
        if not state_is_live(self.fhir, state, {r.line: r.rec for r in self.valid}):
            log.warning(
                "progress in %s names studies that are not on %s (server reset?); starting over",
                state.path,
                self.fhir.base_url,
            )
            state.reset()

    def _load_images(self, rows: list[Row]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        limit = self.options.max_image_bytes
        for row in rows:
            path = self.image_paths.get(row.rec.image_index)
            if path is None:
                continue
            size = path.stat().st_size
            if size > limit:
                raise InputError(f"{path} is {size} bytes; the limit is {limit}")
            out[row.rec.image_index] = path.read_bytes()
        return out

    def _run_batch(self, rows: list[Row]) -> BatchResult:
        return send_batch(self.fhir, rows, self._load_images, self.boxes, self.races)

    def send_all(self, committed_studies: Callable[[list[tuple[str, str]]], None]) -> None:
        """Send every batch, ``concurrency`` in flight; ``committed_studies`` gets the studies
        of each committed batch that have their image."""
        concurrency = max(1, self.options.concurrency)
        batches = build_batches(self.todo, max(1, self.options.batch_size))
        # A bounded window: only ~2 batches per worker are built (and their images read) ahead.
        window = 2 * concurrency
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            pending: set[Future[BatchResult]] = set()
            exhausted = False
            try:
                while pending or not exhausted:
                    while not exhausted and len(pending) < window:
                        batch = next(batches, None)
                        if batch is None:
                            exhausted = True
                            break
                        pending.add(pool.submit(self._run_batch, batch))
                    if not pending:
                        break
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        committed_studies(self._record(future.result()))
            except BaseException:
                # Interrupted (Ctrl-C, a test hook): what committed is recorded; let in-flight
                # batches finish rather than abandon transactions whose outcome we never learn.
                for future in pending:
                    future.cancel()
                raise

    def _record(self, result: BatchResult) -> list[tuple[str, str]]:
        """Count a finished batch and write its progress; its studies with images."""
        self.tally.merge(result.counts)
        if result.committed_lines:
            self.state.add(result.committed_lines)
        self.done_rows += len(result.rows)
        self.committed_batches += 1
        if self.progress is not None:
            written = sum(self.tally.created.values()) + sum(self.tally.present.values())
            self.progress(Progress(len(self.todo), self.done_rows, written))
        if self.on_batch_committed is not None:
            self.on_batch_committed(self.committed_batches)
        return result.image_studies

    def report(self, inference: dict[str, int]) -> IngestReport:
        tally, boxes = self.tally, self.boxes
        if boxes:
            for bad in tally.failed:
                for box in boxes.get(bad.image_index or "", ()):
                    reason = f"not attached: its row failed (line {bad.line})"
                    tally.bad_boxes.append(BadLine(box.line, box.image_index, reason))
        options = self.options
        return IngestReport(
            metadata=str(options.metadata),
            metadata_sha256=self.sha,
            fhir_base_url=self.fhir.base_url,
            images=str(options.images) if options.images else None,
            started=self.started.isoformat(timespec="seconds"),
            wall_s=time.monotonic() - self.t0,
            rows_read=len(self.valid) + len(self.skipped),
            rows_valid=len(self.valid),
            rows_created=tally.rows_created,
            rows_already_present=tally.rows_present,
            rows_resumed=len(self.valid) - len(self.todo),
            rows_with_images=sum(1 for r in self.valid if r.rec.image_index in self.image_paths),
            studies_activated=tally.activated,
            created=dict(sorted(tally.created.items())),
            already_present=dict(sorted(tally.present.items())),
            skipped=self.skipped,
            failed=tally.failed,
            inference=inference,
            state_file=str(self.state.path),
            conflicts_retried=self.races.count,
            bbox=str(options.bbox) if options.bbox else None,
            boxes_read=self.boxes_read,
            boxes_written=tally.boxes_written,
            boxes_already_present=tally.boxes_present,
            studies_boxes_updated=tally.studies_boxed,
            boxes_skipped=sorted(tally.bad_boxes, key=lambda b: b.line),
        )
