"""The job: one ImagingStudy version → pixels → one model pass → one FHIR transaction.

Idempotent by construction: the report identifier is (study, model version, image sha256)
and every write in the transaction is a conditional create on it, so a job that runs
twice — duplicate notifications, a worker killed after writing, a sweep that overlaps the
hook — changes nothing the second time. The embeddings are upserted after the transaction; a
job that finds the report current but its row in the store missing (it stopped in between)
writes that row and nothing else. What goes wrong is classified once
(:mod:`subscriptions.failures`): bad input becomes one failed ``Task`` per study (updated,
never duplicated) at once; transient and unknown errors are raised for the queue to retry
with backoff, and the final attempt writes the failed Task. A study without an image waits
for it, and a withdrawn one is closed (:mod:`subscriptions.lifecycle`).

:meth:`Pipeline.process_batch` is the bulk path (``cxr ingest --bulk-inference``): the same
steps for many studies, except that the model sees all their images in one batched pass.
Reading, checking and writing are the very functions :meth:`Pipeline.process` uses, so a
study's results and identifiers do not depend on the path that produced them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from cxr_errors import (
    CxrError,
    FhirError,
    FhirUnavailableError,
    InputError,
    MissingImageError,
    ModelError,
    NotFoundError,
    StoreError,
)
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.identifiers import report_identifier, study_model_identifier
from fhir_service.fhir.inbound import check_resource
from fhir_service.fhir.model_card import ModelEvaluation
from fhir_service.fhir.results import build_result_transaction
from fhir_service.fhir.studies import study_age_and_view
from models.types import ImageAnalysis
from subscriptions.dicomweb import DicomSource
from subscriptions.failures import DEFAULT_RETRY, Kind, RetryPolicy, classify, new_correlation_id
from subscriptions.lifecycle import (
    LIVE_REPORT_STATUSES,
    WITHDRAWN_STATUSES,
    StudyTasks,
    last_updated,
)
from subscriptions.logcontext import job_context
from subscriptions.metrics import JobMetrics
from subscriptions.pacs_results import store_dicom_results
from subscriptions.pixels import Pixels, fetch_pixels, input_media
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

    last_timings: dict[str, float]
    """seconds per stage of the last call (e.g. decode, densenet, clip, overlays)"""

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
    revision: int = 0
    """of the report key (see :func:`~fhir_service.fhir.identifiers.report_identifier`)"""
    embeddings_only: bool = False
    """the report is current but its embeddings are not in the store: write only those"""


class EmbeddingSink(Protocol):
    def upsert(self, record: EmbeddingRecord) -> None: ...

    def get(self, study_id: str, model_version: str) -> EmbeddingRecord | None: ...

    def delete(self, study_id: str) -> int: ...


@dataclass
class Pipeline:
    fhir: FhirClient
    analyzer: Analyzer
    store: EmbeddingSink | None = None
    max_image_bytes: int = 64 * 1024 * 1024
    image_hosts: frozenset[str] = field(default_factory=frozenset)
    image_wait: timedelta = timedelta(0)
    """how long an available study without an image waits for one (CXR_IMAGE_WAIT)"""
    retry: RetryPolicy = DEFAULT_RETRY
    pacs: DicomSource | None = None
    """the PACS studies with a DICOMweb Endpoint (or a Study Instance UID) are read from"""
    pacs_results: bool = False
    """STOW the SR and heatmap Segmentation of a study read over DICOMweb (CXR_PACS_RESULTS)"""
    evaluation: ModelEvaluation | None = None
    """what the model card shows of ``cxr evaluate`` (CXR_MODEL_EVALUATION)"""
    metrics: JobMetrics = field(default_factory=JobMetrics)

    def __post_init__(self) -> None:
        self.tasks = StudyTasks(self.fhir, self.image_wait, self._failed)

    def _failed(self, business_status: str) -> None:
        self.metrics.failed.labels(reason=business_status).inc()

    # --- the job --------------------------------------------------------------------------

    def process(
        self,
        study_id: str,
        version_id: str,
        *,
        attempt: int = 0,
        correlation_id: str | None = None,
    ) -> str:
        """Process the study's *current* version; returns what happened (for logs/tests).

        Out-of-order notifications are harmless: whichever version a job names, it reads
        the study as it is now, and the identifier keeps the result unique. ``attempt`` is
        how many runs of this job came before (procrastinate's count): the retry policy
        decides from it whether this run is the last for the error it meets.
        """
        cid = correlation_id or new_correlation_id()
        with job_context(study_id, cid):
            with self._stage("study"):
                study = self._current(study_id, withdrawn=True)
            if isinstance(study, str):
                outcome = study
            elif study.get("status") in WITHDRAWN_STATUSES:
                outcome = self._withdraw(study)
            else:
                outcome = self._guarded(
                    study, attempt, cid, lambda: self._process(study, version_id)
                )
            self._count(outcome)
            log.info("ImagingStudy/%s (%s): %s", study_id, version_id, outcome)
            return outcome

    def _withdraw(self, study: dict[str, Any]) -> str:
        """A withdrawn study leaves the similar-case index first (``$similar`` must not offer
        a study entered in error, perhaps another patient's images, as a prior case), then
        its open Task is cancelled and its results are marked. Both halves are idempotent."""
        removed = self.store.delete(study["id"]) if self.store is not None else 0
        outcome = self.tasks.withdraw(study)
        return outcome + ("; taken out of the similar-case index" if removed else "")

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

    def _current(self, study_id: str, *, withdrawn: bool = False) -> dict[str, Any] | str:
        """The study as it is now, or why there is nothing to do. ``registered`` studies wait
        (their notification comes again when they become ``available``)."""
        try:
            study = self.fhir.read("ImagingStudy", study_id)
        except NotFoundError:
            log.warning("ImagingStudy/%s is gone; nothing to do", study_id)
            return "gone"
        status = study.get("status")
        if status == "available" or (withdrawn and status in WITHDRAWN_STATUSES):
            return study
        return f"skipped: status {status!r}"

    def _guarded(
        self, study: dict[str, Any], attempt: int, correlation_id: str, step: Callable[[], T]
    ) -> T | str:
        """Run one step of a job, every exception classified once: no image yet → wait;
        bad input → failed Task; transient or unknown → raised for the queue to retry, and
        a failed Task first when the retry policy says this attempt was the last."""
        try:
            return step()
        except MissingImageError as exc:
            if self._reported_from_unreachable_pixels(study):
                self.tasks.complete(study)
                return f"already reported; its image is not reachable now: {exc.message}"
            return self.tasks.missing_image(study, exc)
        except Exception as exc:
            failure = classify(exc)
            if failure.kind is Kind.BAD_INPUT:
                self.tasks.fail(study, failure.reason, failure.business_status)
                return f"failed: {failure.reason}"
            if not self.retry.is_final(failure.kind, attempt):
                self.metrics.retried.labels(kind=failure.kind.value).inc()
                log.warning(
                    "attempt %d failed (%s), will retry: %s",
                    attempt + 1,
                    failure.kind,
                    failure.reason,
                )
                raise
            self._give_up(study, failure.kind, failure.reason, attempt, correlation_id, exc)
            raise

    def _give_up(
        self,
        study: dict[str, Any],
        kind: Kind,
        detail: str,
        attempt: int,
        correlation_id: str,
        exc: BaseException,
    ) -> None:
        """The final attempt failed: a failed Task says so (if HAPI takes it; if not, the
        study has no Task and no report, which the stuck sweep finds and queues again)."""
        if kind is Kind.TRANSIENT:
            reason = (
                f"gave up after {attempt + 1} attempts over "
                f"{self.retry.total_wait_s(kind) / 60:.0f} min: {detail}"
            )
            code = "retries-exhausted"
            log.error("giving up after %d attempts: %s", attempt + 1, detail)
        else:
            reason = (
                f"internal error while analysing the study (correlation id {correlation_id}); "
                "the worker's log has the details under that id"
            )
            code = "internal-error"
            log.error("internal error, correlation id %s: %s", correlation_id, detail, exc_info=exc)
        try:
            self.tasks.fail(study, reason, code)
        except Exception:
            log.exception("could not write the failed Task of ImagingStudy/%s", study.get("id"))

    def _count(self, outcome: str) -> None:
        for label in ("reported", "already reported", "waiting", "withdrawn", "skipped", "gone"):
            if outcome.startswith(label):
                self.metrics.succeeded.labels(outcome=label.replace(" ", "-")).inc()
                return

    def _bulk_step(self, study: dict[str, Any], step: Callable[[], T]) -> T | str:
        """:meth:`_guarded` for one study of a batch: a transient error becomes its outcome
        instead of stopping the batch (see :meth:`process_batch`)."""
        try:
            return self._guarded(study, 0, new_correlation_id(), step)
        except ModelError:
            raise  # the model itself is broken: no point going on with other studies
        except CxrError as exc:
            return f"failed: {exc.message} (left to the worker's retries)"

    def _process(self, study: dict[str, Any], version_id: str) -> str:
        if version_id.startswith("Media/"):
            with self._stage("dedup"):
                unchanged = self._unchanged_since_report(study)
            if unchanged and not self._embeddings_missing(study["id"]):
                self.tasks.complete(study)
                return "already reported (nothing read has changed)"
        job = self._prepare(study)
        if isinstance(job, str):
            return job
        started = time.monotonic()
        result = self.analyzer.analyze(job.pixels.data, job.pixels.source)
        self.metrics.model_pass.observe(time.monotonic() - started)
        for stage, seconds in self.analyzer.last_timings.items():
            self.metrics.stage.labels(stage=stage).observe(seconds)
        return self._write(job, result)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Time one stage of the job into ``cxr_job_stage_seconds{stage=name}``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.stage.labels(stage=name).observe(time.perf_counter() - started)

    def _prepare(self, study: dict[str, Any]) -> _Job | str:
        """The study's pixels and report key, or "already reported"."""
        check_resource(study, "ImagingStudy", what=f"ImagingStudy/{study.get('id')}")
        with self._stage("pixels"):
            pixels = fetch_pixels(
                self.fhir,
                study,
                max_bytes=self.max_image_bytes,
                allowed_hosts=self.image_hosts,
                pacs=self.pacs,
            )
            sha = hashlib.sha256(pixels.data).hexdigest()
        with self._stage("dedup"):
            revision, identifier, reported = self._report_key(study["id"], sha)
        if reported and self._embeddings_missing(study["id"], sha):
            return _Job(study, pixels, sha, identifier, revision, embeddings_only=True)
        if reported:
            self.tasks.complete(study)
            return "already reported"
        return _Job(study, pixels, sha, identifier, revision)

    def _embeddings_missing(self, study_id: str, sha: str | None = None) -> bool:
        """Whether a reported study's row in the similar-case index is missing (or is of
        another image than ``sha``): the job that wrote the report stopped before its upsert,
        or the store refused it. A store that cannot answer now is left to the stuck sweep."""
        if self.store is None:
            return False
        try:
            row = self.store.get(study_id, self.analyzer.model_version)
        except StoreError as exc:
            log.warning(
                "ImagingStudy/%s: cannot tell whether its embeddings are stored (%s); the "
                "stuck sweep looks again",
                study_id,
                exc.message,
            )
            return False
        return row is None or (sha is not None and row.image_sha256 != sha)

    def _reported_from_unreachable_pixels(self, study: dict[str, Any]) -> bool:
        """Whether a current report stands for a study whose image this worker cannot read:
        written by a writer that had the pixels (bulk inference from files, an earlier run
        from a PACS). Its report stands and no Task may contradict it. Not when an image of
        the study was marked entered-in-error (a wrong image withdrawn): then the study waits
        and fails as any study without an image, and the census shows the contradiction."""
        sid = study["id"]
        if not self._current_reports(sid, self.analyzer.model_version):
            return False
        withdrawn = {"part-of": f"ImagingStudy/{sid}", "status": "entered-in-error"}
        return self.fhir.count("Media", withdrawn) == 0

    def _unchanged_since_report(self, study: dict[str, Any]) -> bool:
        """Whether the study's one current report was made from what a job would read now:
        its Provenance names the study's current version and the current version of its
        newest input Media. A Media posted with its study notifies a second time, mostly
        while the study's own job runs; that second job is answered with three small
        searches instead of fetching and hashing the pixels again. A result read from a
        PACS names no Media, so it is never answered this way."""
        reports = self._current_reports(study["id"], self.analyzer.model_version)
        if len(reports) != 1:
            return False
        media = input_media(self.fhir, study["id"], without_content=True)
        version = (media[0].get("meta") or {}).get("versionId") if media else None
        study_version = (study.get("meta") or {}).get("versionId")
        if version is None or study_version is None:
            return False
        read_now = {
            f"ImagingStudy/{study['id']}/_history/{study_version}",
            f"Media/{media[0]['id']}/_history/{version}",
        }
        found = self.fhir.search("Provenance", {"target": f"DiagnosticReport/{reports[0]['id']}"})
        sources = {
            str((entity.get("what") or {}).get("reference"))
            for entry in found.get("entry", [])
            for entity in entry["resource"].get("entity", [])
            if entity.get("role") == "source"
        }
        return read_now <= sources

    def _report_key(self, study_id: str, sha: str) -> tuple[int, tuple[str, str], bool]:
        """(revision, identifier) of the report for these pixels, and whether it is current.

        One search, unless these pixels' report was withdrawn (their image was replaced and
        has come back, A → B → A): the next revision gets a key of its own, because the
        conditional create would otherwise find the withdrawn report and write nothing."""
        for revision in range(_MAX_REVISIONS):
            identifier = report_identifier(
                study_id, self.analyzer.model_version, sha, revision=revision
            )
            found = self._reports_by(*identifier)
            if not found:
                return revision, identifier, False
            if any(_live(r) for r in found):
                return revision, identifier, True
        raise InputError(
            f"ImagingStudy/{study_id}: the report of these pixels was withdrawn "
            f"{_MAX_REVISIONS} times; not writing another"
        )

    def _write(self, job: _Job, result: AnalyzedImage | InputError) -> str:
        """One transaction with the study's results (closing its open Task), then its embeddings."""
        if isinstance(result, InputError):
            raise result
        study, sha = job.study, job.sha256
        # Built (and checked) before anything is written: a record the store would refuse
        # fails the study here, not beside a report already committed.
        record = None if self.store is None else self._record(study, result, sha)
        if job.embeddings_only:
            self._upsert(record)
            self.tasks.complete(study)
            return "already reported; its missing embeddings are stored now"
        with self._stage("lookups"):
            previous = self._current_reports(study["id"], self.analyzer.model_version)
            open_task = self.tasks.open_task(study["id"])
        if any(_has_identifier(r, *job.identifier) for r in previous):
            # Another writer reported these same pixels while the model ran. Superseding its
            # report here would withdraw the very report our conditional create resolves to.
            self.tasks.complete(study)
            return "already reported (concurrent writer)"
        derived = None
        if self.pacs is not None and self.pacs_results and job.pixels.instance is not None:
            with self._stage("pacs-results"):
                derived = store_dicom_results(
                    self.pacs, job.pixels.data, result.analysis, job.identifier[1]
                )
        bundle = build_result_transaction(
            study=study,
            analysis=result.analysis,
            heatmaps=result.heatmaps,
            image_sha256=sha,
            recorded=datetime.now(UTC),
            supersedes=previous,
            derived=derived,
            source=job.pixels.source_image,
            evaluation=self.evaluation,
            open_task=open_task,
            revision=job.revision,
        )
        try:
            with self._stage("transaction"):
                self.fhir.transaction(bundle)
        except FhirError as exc:
            # Another writer (a second worker without the queue's lock, bulk inference during
            # ingest) committed the same conditional creates first: HAPI refuses ours with
            # 409/412. If its report is there, the work is done; otherwise retry later.
            if exc.http_status not in (409, 412):
                raise
            if self._reported(*job.identifier, attempts=3):
                self.tasks.complete(study)
                return "already reported (concurrent writer)"
            raise FhirUnavailableError(f"conflicting concurrent write: {exc.message}") from exc
        self._observe_latency(study)
        self._upsert(record)
        return "reported"

    def _upsert(self, record: EmbeddingRecord | None) -> None:
        """``record`` is None exactly when this pipeline has no store."""
        if self.store is not None and record is not None:
            with self._stage("embedding"):
                self.store.upsert(record)

    # --- helpers --------------------------------------------------------------------------

    def _reported(self, system: str, value: str, *, attempts: int = 1) -> bool:
        """Whether a current report has this identifier; after a write conflict the winner's
        commit may take a moment to become visible, hence ``attempts`` (one second apart)."""
        for attempt in range(attempts):
            if attempt:
                time.sleep(1.0)
            if any(_live(r) for r in self._reports_by(system, value)):
                return True
        return False

    def _reports_by(self, system: str, value: str) -> list[dict[str, Any]]:
        found = self.fhir.search(
            "DiagnosticReport", {"identifier": f"{system}|{value}", "_elements": "id,status"}
        )
        return [e["resource"] for e in found.get("entry", [])]

    def _current_reports(self, study_id: str, model_version: str) -> list[dict[str, Any]]:
        """Reports for this study and model that are still current."""
        system, value = study_model_identifier(study_id, model_version)
        return [
            r
            for r in self.fhir.search_all("DiagnosticReport", {"identifier": f"{system}|{value}"})
            if _live(r)
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

    def _observe_latency(self, study: dict[str, Any]) -> None:
        """POST → report, as the integrator sees it: from the study's last update (a late
        image's wait included) to the committed report."""
        posted = last_updated(study)
        if posted is not None:
            seconds = (datetime.now(UTC) - posted).total_seconds()
            self.metrics.post_to_report.observe(max(seconds, 0.0))


_MAX_REVISIONS = 20
"""how often one image's report may be withdrawn and written again (A → B → A → B …)"""


def _live(report: dict[str, Any]) -> bool:
    return report.get("status") in LIVE_REPORT_STATUSES


def _has_identifier(resource: dict[str, Any], system: str, value: str) -> bool:
    return any(
        i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier", [])
    )
