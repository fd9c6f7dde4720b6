"""The job: one ImagingStudy version → pixels → one model pass → one FHIR transaction.

Idempotent by construction: the report identifier is (study, model version, image sha256)
and every write in the transaction is a conditional create on it, so a job that runs
twice — duplicate notifications, a worker killed after writing, a sweep that overlaps the
hook — changes nothing the second time. Failures that retrying cannot fix become one
failed ``Task`` per study (updated, never duplicated); transient ones are raised for the
queue to retry with backoff.

:meth:`Pipeline.process_batch` is the bulk path (``cxr ingest --bulk-inference``): the same
steps for many studies, except that the model sees all their images in one batched pass.
Reading, checking and writing are the very functions :meth:`Pipeline.process` uses, so a
study's results and identifiers do not depend on the path that produced them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from cxr_errors import (
    CxrError,
    FhirError,
    FhirUnavailableError,
    InputError,
    ModelError,
    NotFoundError,
)
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.identifiers import report_identifier, study_model_identifier, task_identifier
from fhir_service.fhir.inbound import check_resource
from fhir_service.fhir.results import build_result_transaction
from fhir_service.fhir.studies import study_age_and_view
from fhir_service.fhir.tasks import build_completed_task, build_failed_task
from models.types import ImageAnalysis
from subscriptions.pixels import Pixels, fetch_pixels
from vector_store.records import EmbeddingRecord

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class AnalyzedImage:
    analysis: ImageAnalysis
    heatmaps: dict[str, bytes]
    """finding → overlay PNG, for the positive findings"""
    clip_embedding: npt.NDArray[np.float32] | None
    clip_version: str | None = None
    """the CLIP model that made ``clip_embedding`` (embeddings are keyed by both versions)"""


class Analyzer(Protocol):
    """What the job needs from the model layer (models/ behind an adapter)."""

    @property
    def model_version(self) -> str: ...

    def analyze(self, data: bytes, name: str) -> AnalyzedImage: ...

    def analyze_many(self, images: Sequence[tuple[bytes, str]]) -> list[AnalyzedImage | InputError]:
        """One batched pass over ``(data, name)`` images; an image that cannot be decoded
        gets its InputError in its place instead of failing the others."""
        ...


@dataclass(frozen=True)
class _Job:
    """A study that needs analysing: its current version and its pixels."""

    study: dict[str, Any]
    pixels: Pixels
    sha256: str
    identifier: tuple[str, str]


class EmbeddingSink(Protocol):
    def upsert(self, record: EmbeddingRecord) -> None: ...


@dataclass
class Pipeline:
    fhir: FhirClient
    analyzer: Analyzer
    store: EmbeddingSink | None = None
    max_image_bytes: int = 64 * 1024 * 1024
    image_hosts: frozenset[str] = field(default_factory=frozenset)

    # --- the job --------------------------------------------------------------------------

    def process(self, study_id: str, version_id: str, *, final_attempt: bool = True) -> str:
        """Process the study's *current* version; returns what happened (for logs/tests).

        Out-of-order notifications are harmless: whichever version a job names, it reads
        the study as it is now, and the identifier keeps the result unique.
        """
        study = self._current(study_id)
        if isinstance(study, str):
            return study
        return self._guarded(study, final_attempt, lambda: self._process(study))

    def process_batch(self, studies: Sequence[tuple[str, str]]) -> list[str]:
        """The bulk path: :meth:`process` for each study, with one batched model pass over
        the images of those not yet reported. Returns one outcome per study, in order.

        A study that fails does not stop the others: bad input gets its failed Task, as on
        the worker; a transient failure only a ``"failed: …"`` outcome, because the study
        stays ``available`` without a report, which the rest-hook's queued job (or ``cxr
        reconcile``) retries with backoff.
        """
        outcomes: list[str] = [""] * len(studies)
        jobs: list[tuple[int, _Job]] = []
        for i, (study_id, _version) in enumerate(studies):
            study = self._current(study_id)
            if isinstance(study, str):
                outcomes[i] = study
                continue
            job = self._bulk_step(study, partial(self._prepare, study))
            if isinstance(job, _Job):
                jobs.append((i, job))
            else:
                outcomes[i] = job
        if not jobs:
            return outcomes
        results = self.analyzer.analyze_many([(j.pixels.data, j.pixels.source) for _, j in jobs])
        for (i, job), result in zip(jobs, results, strict=True):
            outcomes[i] = self._bulk_step(job.study, partial(self._write, job, result))
        return outcomes

    def _current(self, study_id: str) -> dict[str, Any] | str:
        """The study as it is now, or why there is nothing to do."""
        try:
            study = self.fhir.read("ImagingStudy", study_id)
        except NotFoundError:
            log.warning("ImagingStudy/%s is gone; nothing to do", study_id)
            return "gone"
        if study.get("status") != "available":
            return f"skipped: status {study.get('status')!r}"
        return study

    def _guarded(
        self, study: dict[str, Any], final_attempt: bool, step: Callable[[], T]
    ) -> T | str:
        """Run one step of a job: bad input → failed Task; other errors → failed Task on the
        final attempt, raised either way (the queue retries)."""
        try:
            return step()
        except InputError as exc:
            self._fail(study, exc.message, "input-rejected")
            return f"failed: {exc.message}"
        except CxrError as exc:
            if final_attempt:
                self._fail(study, f"gave up after retries: {exc.message}", "retries-exhausted")
            raise

    def _bulk_step(self, study: dict[str, Any], step: Callable[[], T]) -> T | str:
        """:meth:`_guarded` for one study of a batch: a transient error becomes its outcome
        instead of stopping the batch (see :meth:`process_batch`)."""
        try:
            return self._guarded(study, False, step)
        except ModelError:
            raise  # the model itself is broken: no point going on with other studies
        except CxrError as exc:
            return f"failed: {exc.message} (left to the worker's retries)"

    def _process(self, study: dict[str, Any]) -> str:
        job = self._prepare(study)
        if isinstance(job, str):
            return job
        return self._write(job, self.analyzer.analyze(job.pixels.data, job.pixels.source))

    def _prepare(self, study: dict[str, Any]) -> _Job | str:
        """The study's pixels and report key, or "already reported"."""
        check_resource(study, "ImagingStudy", what=f"ImagingStudy/{study.get('id')}")
        pixels = fetch_pixels(
            self.fhir, study, max_bytes=self.max_image_bytes, allowed_hosts=self.image_hosts
        )
        sha = hashlib.sha256(pixels.data).hexdigest()
        identifier = report_identifier(study["id"], self.analyzer.model_version, sha)
        if self._reported(*identifier):
            self._complete_task(study)
            return "already reported"
        return _Job(study, pixels, sha, identifier)

    def _write(self, job: _Job, result: AnalyzedImage | InputError) -> str:
        """One transaction with the study's results, then its embeddings."""
        if isinstance(result, InputError):
            raise result
        study, sha = job.study, job.sha256
        previous = self._current_reports(study["id"], self.analyzer.model_version)
        bundle = build_result_transaction(
            study=study,
            analysis=result.analysis,
            heatmaps=result.heatmaps,
            image_sha256=sha,
            recorded=datetime.now(UTC),
            supersedes=previous,
        )
        try:
            self.fhir.transaction(bundle)
        except FhirError as exc:
            # Another writer (a second worker without the queue's lock, bulk inference during
            # ingest) committed the same conditional creates first: HAPI refuses ours with
            # 409/412. If its report is there, the work is done; otherwise retry later.
            if exc.http_status not in (409, 412):
                raise
            if self._reported(*job.identifier, attempts=3):
                self._complete_task(study)
                return "already reported (concurrent writer)"
            raise FhirUnavailableError(f"conflicting concurrent write: {exc.message}") from exc
        if self.store is not None:
            self.store.upsert(self._record(study, result, sha))
        self._complete_task(study)
        return "reported"

    # --- helpers --------------------------------------------------------------------------

    def _reported(self, system: str, value: str, *, attempts: int = 1) -> bool:
        """Whether the report exists; after a write conflict the winner's commit may take a
        moment to become visible, hence ``attempts`` (one second apart)."""
        for attempt in range(attempts):
            if attempt:
                time.sleep(1.0)
            found = self.fhir.search(
                "DiagnosticReport", {"identifier": f"{system}|{value}", "_elements": "id"}
            )
            if found.get("total", len(found.get("entry", []))):
                return True
        return False

    def _current_reports(self, study_id: str, model_version: str) -> list[dict[str, Any]]:
        """Reports for this study and model that are still current (an older image)."""
        system, value = study_model_identifier(study_id, model_version)
        return [
            r
            for r in self.fhir.search_all("DiagnosticReport", {"identifier": f"{system}|{value}"})
            if r.get("status") not in ("cancelled", "entered-in-error")
        ]

    def _record(self, study: dict[str, Any], result: AnalyzedImage, sha: str) -> EmbeddingRecord:
        a = result.analysis
        patient_ref = study.get("subject", {}).get("reference", "")
        gender = None
        if patient_ref.startswith("Patient/"):
            gender = self.fhir.read_reference(patient_ref).get("gender")
        age, view = study_age_and_view(study)
        return EmbeddingRecord(
            study_id=study["id"],
            model_version=a.model_version,
            patient_id=patient_ref.split("/")[-1],
            gender=gender,
            age=age,
            view_position=view,
            positive_findings=tuple(f.finding for f in a.findings if f.positive),
            clip=result.clip_embedding,
            densenet=a.features,
            study_version_id=str(study.get("meta", {}).get("versionId", "")),
            image_sha256=sha,
            clip_version=result.clip_version if result.clip_embedding is not None else None,
        )

    def _task(self, study: dict[str, Any]) -> dict[str, Any] | None:
        system, value = task_identifier(study["id"])
        bundle = self.fhir.search("Task", {"identifier": f"{system}|{value}"})
        entries = bundle.get("entry", [])
        return dict(entries[0]["resource"]) if entries else None

    def _fail(self, study: dict[str, Any], reason: str, business_status: str) -> None:
        log.warning("ImagingStudy/%s failed: %s", study["id"], reason)
        task = build_failed_task(study, reason, business_status, existing_task=self._task(study))
        self._put_task(task)

    def _complete_task(self, study: dict[str, Any]) -> None:
        task = self._task(study)
        if task is not None and task.get("status") != "completed":
            self._put_task(build_completed_task(task))

    def _put_task(self, task: dict[str, Any]) -> None:
        if task.get("id"):
            self.fhir.update(task)
        else:
            system, value = task_identifier(task["focus"]["reference"].split("/")[-1])
            self.fhir.create(task, if_none_exist=f"identifier={system}|{value}")
