"""The job's states, end to end against an in-memory FHIR server: a study waits for its image,
fails when the wait runs out, is still reported when the image comes late (its Task closed),
is withdrawn when cancelled or entered in error; every failure is classified once."""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest

from cxr_errors import FhirUnavailableError, ImageError, InputError, StoreError
from fhir_service.fhir.tasks import task_business_status, waiting_deadline
from models.types import ImageAnalysis
from subscriptions.failures import RetryPolicy
from subscriptions.lifecycle import study_deadline
from subscriptions.metrics import JobMetrics
from subscriptions.pipeline import AnalyzedImage, Pipeline
from tests.factories import make_analysis, make_heatmaps, make_png
from tests.fake_fhir import FakeFhir
from vector_store.memory import InMemoryVectorStore
from vector_store.records import EmbeddingRecord

WAIT = timedelta(minutes=15)


class _Analyzer:
    """Stands in for the models: analyses any image, or raises what a test tells it to."""

    model_version = "test-model"

    def __init__(self) -> None:
        self.raises: BaseException | None = None
        self.calls = 0
        self.last_timings = {"densenet": 0.25}

    def analyze(self, data: bytes, name: str) -> AnalyzedImage:
        self.calls += 1
        if self.raises is not None:
            raise self.raises
        analysis: ImageAnalysis = make_analysis({"Pneumothorax": 0.9}, model_version="test-model")
        return AnalyzedImage(analysis, make_heatmaps(analysis), None)

    def analyze_many(self, images: Sequence[tuple[bytes, str]]) -> list[AnalyzedImage | InputError]:
        return [self.analyze(d, n) for d, n in images]


@pytest.fixture
def server() -> FakeFhir:
    fake = FakeFhir()
    fake.put({"resourceType": "Patient", "id": "p1"})
    return fake


def _pipeline(server: FakeFhir, analyzer: _Analyzer | None = None, **kw: Any) -> Pipeline:
    return Pipeline(fhir=server.client(), analyzer=analyzer or _Analyzer(), image_wait=WAIT, **kw)


def _study(server: FakeFhir, sid: str = "s1", status: str = "available") -> dict[str, Any]:
    return server.put(
        {
            "resourceType": "ImagingStudy",
            "id": sid,
            "status": status,
            "subject": {"reference": "Patient/p1"},
        }
    )


def _media(server: FakeFhir, sid: str = "s1", data: bytes | None = None) -> dict[str, Any]:
    png = data if data is not None else make_png(width=16, height=16)
    return server.put(
        {
            "resourceType": "Media",
            "status": "completed",
            "partOf": [{"reference": f"ImagingStudy/{sid}"}],
            "content": {"contentType": "image/png", "data": base64.b64encode(png).decode()},
        }
    )


def _task(server: FakeFhir) -> dict[str, Any]:
    tasks = server.all("Task")
    assert len(tasks) == 1, "a study has exactly one Task"
    return tasks[0]


def _reports(server: FakeFhir) -> list[dict[str, Any]]:
    return server.all("DiagnosticReport")


def test_a_study_without_an_image_waits_visibly_until_its_deadline(server: FakeFhir) -> None:
    study = _study(server)
    outcome = _pipeline(server).process("s1", "1")
    assert outcome.startswith("waiting for images until")
    task = _task(server)
    assert task["status"] == "on-hold"
    assert task_business_status(task) == "waiting-for-images"
    assert waiting_deadline(task) == study_deadline(study, WAIT)
    assert "waiting for the image" in task["statusReason"]["text"]
    assert "fails if none arrives by" in task["statusReason"]["text"]
    # a repeat notification changes nothing (no new Task version)
    assert _pipeline(server).process("s1", "1").startswith("waiting")
    assert _task(server)["meta"]["versionId"] == "1"


def test_the_image_arriving_while_waiting_gives_the_report_and_completes_the_task(
    server: FakeFhir,
) -> None:
    _study(server)
    _pipeline(server).process("s1", "1")
    _media(server)
    assert _pipeline(server).process("s1", "media") == "reported"
    assert len(_reports(server)) == 1
    task = _task(server)
    assert task["status"] == "completed"
    assert "arrived while the study was waiting" in task["statusReason"]["text"]
    assert task["output"][0]["valueReference"]["reference"].startswith("DiagnosticReport/")


def test_no_image_within_the_wait_fails_then_a_late_image_still_reports(
    server: FakeFhir,
) -> None:
    _study(server)
    pipeline = _pipeline(server)
    pipeline.process("s1", "1")
    later = datetime.now(UTC) + WAIT + timedelta(seconds=1)
    task = pipeline.tasks.missing_image(server.all("ImagingStudy")[0], _missing(), now=later)
    assert task.startswith("failed:")
    failed = _task(server)
    assert failed["status"] == "failed" and task_business_status(failed) == "no-pixels"
    assert "none arrived within 15 min" in failed["statusReason"]["text"]
    # the image comes after the failure: report, and the one Task closed with the reason
    _media(server)
    assert pipeline.process("s1", "late") == "reported"
    assert len(_reports(server)) == 1
    closed = _task(server)
    assert closed["status"] == "completed"
    assert "earlier failure" in closed["statusReason"]["text"]
    assert "none arrived within 15 min" in closed["statusReason"]["text"]


def _missing() -> Any:
    from cxr_errors import MissingImageError

    return MissingImageError("no pixels: no Media with partOf ImagingStudy/s1 holds an image")


def test_a_zero_wait_fails_at_once(server: FakeFhir) -> None:
    # The fake's clock runs ahead of the real one by a millisecond a write: a study written
    # a few ms "from now" would still be inside a zero wait if the test ran fast enough.
    server.clock -= timedelta(seconds=1)
    _study(server)
    outcome = Pipeline(fhir=server.client(), analyzer=_Analyzer()).process("s1", "1")
    assert outcome.startswith("failed: no pixels")
    assert _task(server)["status"] == "failed"


def test_registered_studies_wait_without_a_task(server: FakeFhir) -> None:
    _study(server, status="registered")
    assert _pipeline(server).process("s1", "1") == "skipped: status 'registered'"
    assert server.all("Task") == []


def test_a_cancelled_study_closes_its_waiting_task(server: FakeFhir) -> None:
    study = _study(server)
    _pipeline(server).process("s1", "1")
    server.put({**study, "status": "cancelled"})
    assert _pipeline(server).process("s1", "2") == "withdrawn: cancelled"
    task = _task(server)
    assert task["status"] == "cancelled"
    assert task_business_status(task) == "withdrawn"
    assert "'cancelled'" in task["statusReason"]["text"]


def test_an_entered_in_error_study_marks_its_results_entered_in_error(server: FakeFhir) -> None:
    study = _study(server)
    _media(server)
    store = InMemoryVectorStore()
    pipeline = _pipeline(server, _IndexedAnalyzer(), store=store)
    assert pipeline.process("s1", "1") == "reported"
    assert store.get("s1", "test-model") is not None
    server.put({**server.all("ImagingStudy")[0], "status": "entered-in-error"})
    outcome = pipeline.process("s1", "2")
    assert outcome.startswith("withdrawn: entered-in-error")
    # never again offered by $similar as a prior case (it may be another patient's image)
    assert outcome.endswith("; taken out of the similar-case index")
    assert store.get("s1", "test-model") is None
    assert {r["status"] for r in _reports(server)} == {"entered-in-error"}
    assert {o["status"] for o in server.all("Observation")} == {"entered-in-error"}
    overlays = [m for m in server.all("Media") if m.get("identifier")]
    assert overlays and {m["status"] for m in overlays} == {"entered-in-error"}
    # the input image is not ours: untouched
    assert [m["status"] for m in server.all("Media") if not m.get("identifier")] == ["completed"]
    # idempotent: nothing more to mark
    assert pipeline.process("s1", "2") == "withdrawn: entered-in-error"
    assert study["id"] == "s1"


def test_an_undecodable_image_is_bad_input_failed_at_once_without_retry(
    server: FakeFhir,
) -> None:
    _study(server)
    _media(server)
    analyzer = _Analyzer()
    analyzer.raises = ImageError("Media/2: the image is truncated or corrupt (OSError: ...)")
    outcome = _pipeline(server, analyzer).process("s1", "1", attempt=0)
    assert outcome.startswith("failed: Media/2: the image is truncated")
    task = _task(server)
    assert task["status"] == "failed" and task_business_status(task) == "undecodable-image"


def test_an_unknown_error_is_retried_then_an_internal_error_task_names_the_correlation_id(
    server: FakeFhir, caplog: pytest.LogCaptureFixture
) -> None:
    _study(server)
    _media(server)
    analyzer = _Analyzer()
    analyzer.raises = KeyError("surprise")
    policy = RetryPolicy(internal_retries=2)
    pipeline = _pipeline(server, analyzer, retry=policy, metrics=JobMetrics())
    for attempt in range(2):
        with pytest.raises(KeyError):
            pipeline.process("s1", "1", attempt=attempt)
        assert server.all("Task") == [], "no Task before the final attempt"
    with caplog.at_level(logging.ERROR), pytest.raises(KeyError):
        pipeline.process("s1", "1", attempt=2, correlation_id="c0ffee123456")
    task = _task(server)
    assert task["status"] == "failed" and task_business_status(task) == "internal-error"
    assert "correlation id c0ffee123456" in task["statusReason"]["text"]
    line = next(r for r in caplog.records if "internal error" in r.getMessage())
    assert "c0ffee123456" in line.getMessage()
    assert line.exc_info is not None
    assert getattr(line, "correlation_id", None) in (None, "c0ffee123456")


def test_a_transient_error_is_retried_and_the_final_attempt_says_what_kept_failing(
    server: FakeFhir,
) -> None:
    _study(server)
    _media(server)
    analyzer = _Analyzer()
    analyzer.raises = FhirUnavailableError("FHIR server timed out: POST")
    pipeline = _pipeline(server, analyzer, retry=RetryPolicy(transient_retries=3))
    with pytest.raises(FhirUnavailableError):
        pipeline.process("s1", "1", attempt=2)
    assert server.all("Task") == []
    with pytest.raises(FhirUnavailableError):
        pipeline.process("s1", "1", attempt=3)
    task = _task(server)
    assert task_business_status(task) == "retries-exhausted"
    assert "gave up after 4 attempts" in task["statusReason"]["text"]
    assert "FHIR server timed out" in task["statusReason"]["text"]


def test_hapi_down_on_the_final_attempt_leaves_no_task_and_raises(server: FakeFhir) -> None:
    _study(server)
    _media(server)
    analyzer = _Analyzer()
    analyzer.raises = FhirUnavailableError("down")

    def outage(request: httpx.Request) -> None:
        if request.url.path.endswith("/Task") or request.method != "GET":
            raise httpx.ConnectError("connection refused")

    server.before = outage
    pipeline = _pipeline(server, analyzer, retry=RetryPolicy(transient_retries=0))
    with pytest.raises(FhirUnavailableError):
        pipeline.process("s1", "1")
    server.before = None
    assert server.all("Task") == []  # left for the stuck sweep


def test_job_metrics_count_outcomes_and_failures(server: FakeFhir) -> None:
    metrics = JobMetrics()
    _study(server, "s1")
    _study(server, "s2")
    _media(server, "s2", data=b"\x89PNG\r\n\x1a\nnot really a png")
    _study(server, "s3")
    _media(server, "s3")
    analyzer = _Analyzer()
    pipeline = _pipeline(server, analyzer, metrics=metrics)
    pipeline.process("s1", "1")
    analyzer.raises = ImageError("bad")
    pipeline.process("s2", "1")
    analyzer.raises = None
    pipeline.process("s3", "1")

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    assert value("cxr_jobs_succeeded_total", outcome="waiting") == 1
    assert value("cxr_jobs_succeeded_total", outcome="reported") == 1
    assert value("cxr_jobs_failed_total", reason="undecodable-image") == 1
    assert value("cxr_model_pass_seconds_count") == 1
    assert value("cxr_post_to_report_seconds_count") == 1
    # the per-stage split: every job reads its study, only the reported one wrote
    assert value("cxr_job_stage_seconds_count", stage="study") == 3
    assert value("cxr_job_stage_seconds_count", stage="transaction") == 1
    assert value("cxr_job_stage_seconds_sum", stage="densenet") == 0.25


def _live_reports(server: FakeFhir) -> list[dict[str, Any]]:
    return [r for r in _reports(server) if r["status"] not in ("cancelled", "entered-in-error")]


class _RacingAnalyzer(_Analyzer):
    """While our model runs, another writer (a second worker, bulk inference) reports the
    same study from the same pixels and commits first."""

    def __init__(self, other: Pipeline) -> None:
        super().__init__()
        self.other = other

    def analyze(self, data: bytes, name: str) -> AnalyzedImage:
        assert self.other.process("s1", "other writer") == "reported"
        return super().analyze(data, name)


def test_a_concurrent_writer_of_the_same_pixels_is_never_superseded(server: FakeFhir) -> None:
    """The race the fresh-clone CI's worker log showed (ingest's bulk inference against the
    worker): the second writer read the first one's report as an *older* result and withdrew
    it, while its conditional create resolved to that same report: no current report left."""
    _study(server)
    _media(server)
    ours = _pipeline(server, _RacingAnalyzer(_pipeline(server)))
    assert ours.process("s1", "1") == "already reported (concurrent writer)"
    (report,) = _reports(server)
    assert report["status"] not in ("cancelled", "entered-in-error")


def test_a_reported_study_whose_image_is_gone_stays_reported_and_no_task_contradicts_it(
    server: FakeFhir,
) -> None:
    """Reported from pixels this worker can no longer reach (bulk inference from files; an
    image since removed): the report stands; the job neither waits nor fails, it completes
    the study's Task, so the census finds one state, not "reported but failed"."""
    study = _study(server)
    _pipeline(server).process("s1", "1")  # waits: no image yet
    _media(server)
    reporter = _pipeline(server)
    assert reporter.process("s1", "media") == "reported"
    server.store["Media"] = {
        k: m for k, m in server.store["Media"].items() if m.get("identifier")
    }  # the input image is gone; our heatmaps stay
    server.tick(WAIT.total_seconds() + 60)
    outcome = _pipeline(server).process("s1", "wait-expired")
    assert outcome.startswith("already reported; its image is not reachable now")
    assert len(_live_reports(server)) == 1
    assert _task(server)["status"] == "completed"
    assert study["id"] == "s1"


def test_an_image_replaced_and_then_restored_gets_a_current_report_again(
    server: FakeFhir,
) -> None:
    """A → B → A: A's first report was withdrawn when B came; when A comes back its report
    must be current again (a new one, under the next revision of its key), never "already
    reported" on the strength of the withdrawn one."""
    _study(server)
    image_a, image_b = make_png(width=16, height=16), make_png(width=24, height=16)
    _media(server, data=image_a)
    pipeline = _pipeline(server)
    assert pipeline.process("s1", "a") == "reported"
    _media(server, data=image_b)
    assert pipeline.process("s1", "b") == "reported"
    _media(server, data=image_a)
    assert pipeline.process("s1", "a again") == "reported"
    assert pipeline.process("s1", "a again") == "already reported"
    live = _live_reports(server)
    assert len(live) == 1 and len(_reports(server)) == 3
    first, second = sorted(
        (r for r in _reports(server) if r not in live), key=lambda r: r["meta"]["lastUpdated"]
    )
    assert first["status"] == second["status"] == "cancelled"
    keys = {i["value"] for r in _reports(server) for i in r["identifier"]}
    assert len(keys) == 3 + 1, "three report keys and the one study-model key"


def test_a_media_notification_after_the_report_is_answered_without_reading_the_pixels(
    server: FakeFhir,
) -> None:
    """A study posted with its Media notifies twice; the second job, queued while the first
    ran, finds the report's Provenance naming the study version and Media version it would
    read now. Anything changed since (the image, the study) and it reads the pixels."""
    _study(server)
    media = _media(server)
    analyzer = _Analyzer()
    pipeline = _pipeline(server, analyzer)
    assert pipeline.process("s1", "1") == "reported"
    (provenance,) = server.all("Provenance")
    sources = {e["what"]["reference"] for e in provenance["entity"] if e["role"] == "source"}
    assert {"ImagingStudy/s1/_history/1", f"Media/{media['id']}/_history/1"} <= sources
    requests: list[str] = []
    client = server.client()
    original = client.request

    def counted(method: str, path: str, **kw: Any) -> httpx.Response:
        requests.append(f"{method} {path} {sorted((kw.get('params') or {}).items())}")
        return original(method, path, **kw)

    client.request = counted  # type: ignore[method-assign]
    quick = _pipeline(server, analyzer)
    quick.fhir = client
    mention = f"Media/{media['id']}/_history/1"
    assert quick.process("s1", mention) == "already reported (nothing read has changed)"
    assert analyzer.calls == 1
    media_reads = [r for r in requests if r.startswith("GET Media")]
    assert media_reads and all("_elements" in r for r in media_reads), media_reads
    # the image changes: a new version of that Media, read and reported
    server.put({**server.store["Media"][media["id"]], "content": _media_content(24)})
    assert pipeline.process("s1", f"Media/{media['id']}/_history/2") == "reported"
    assert analyzer.calls == 2 and len(_live_reports(server)) == 1
    # the study changes (same image): the quick answer does not apply, the full one does
    server.put({**server.all("ImagingStudy")[0], "description": "edited"})
    assert pipeline.process("s1", f"Media/{media['id']}/_history/2") == "already reported"
    assert analyzer.calls == 2


def _media_content(width: int) -> dict[str, Any]:
    png = make_png(width=width, height=16)
    return {"contentType": "image/png", "data": base64.b64encode(png).decode()}


def test_a_report_whose_image_was_marked_entered_in_error_is_not_kept_quietly(
    server: FakeFhir,
) -> None:
    """The image was withdrawn as wrong (entered-in-error), not merely unreachable: the job
    does not call the study reported on the strength of the old report; it waits (and then
    fails) for want of an image, and the census shows the report beside that Task."""
    _study(server)
    media = _media(server)
    assert _pipeline(server).process("s1", "1") == "reported"
    server.put({**server.store["Media"][media["id"]], "status": "entered-in-error"})
    outcome = _pipeline(server).process("s1", f"Media/{media['id']}/_history/2")
    assert outcome.startswith("waiting for images until"), outcome
    assert _task(server)["status"] == "on-hold"


class _FlakyStore(InMemoryVectorStore):
    """The similar-case index; its next ``fail`` upserts are refused as a dropped
    connection would be."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0

    def upsert(self, record: EmbeddingRecord) -> None:
        if self.fail:
            self.fail -= 1
            raise StoreError("vector store upsert failed: server closed the connection")
        super().upsert(record)


def _no_open_task(server: FakeFhir) -> bool:
    return all(t["status"] == "completed" for t in server.all("Task"))


class _IndexedAnalyzer(_Analyzer):
    """An analysis with DenseNet features (the stand-in's are zero, which no index takes)."""

    def analyze(self, data: bytes, name: str) -> AnalyzedImage:
        found = super().analyze(data, name)
        features = np.linspace(0.1, 1.0, 1024, dtype=np.float32)
        return replace(found, analysis=replace(found.analysis, features=features))


def test_a_job_stopped_between_its_report_and_its_embeddings_stores_them_on_the_retry(
    server: FakeFhir,
) -> None:
    """The transaction is committed, the upsert is not (store down, worker killed): the
    retry finds the report current and writes the embeddings only, no second report; the
    same goes for the quick answer to a Media notification and for a row of an older image."""
    _study(server)
    media = _media(server)
    store, analyzer = _FlakyStore(), _IndexedAnalyzer()
    pipeline = _pipeline(server, analyzer, store=store, retry=RetryPolicy(transient_retries=3))
    store.fail = 1
    with pytest.raises(StoreError):
        pipeline.process("s1", "1", attempt=0)
    assert len(_live_reports(server)) == 1 and _no_open_task(server)
    assert store.get("s1", "test-model") is None
    outcome = pipeline.process("s1", "1", attempt=1)
    assert outcome == "already reported; its missing embeddings are stored now"
    row = store.get("s1", "test-model")
    assert row is not None and analyzer.calls == 2
    assert len(_reports(server)) == 1 and _no_open_task(server)
    # stored: the next job is answered without the model
    assert pipeline.process("s1", "1") == "already reported"
    mention = f"Media/{media['id']}/_history/1"
    assert pipeline.process("s1", mention) == "already reported (nothing read has changed)"
    assert analyzer.calls == 2
    # lost again (the quick answer does not hide it), or left from another image
    store.delete("s1")
    assert pipeline.process("s1", mention) == outcome
    store.upsert(replace(row, image_sha256="0" * 64))
    assert pipeline.process("s1", "1") == outcome
    restored = store.get("s1", "test-model")
    assert restored is not None and restored.image_sha256 == row.image_sha256
    assert analyzer.calls == 4 and len(_reports(server)) == 1


def test_embeddings_the_index_would_refuse_fail_the_study_before_anything_is_written(
    server: FakeFhir,
) -> None:
    """Checked first, so a refusal is one failed Task, never a failed Task beside a report."""
    _study(server)
    _media(server)
    outcome = _pipeline(server, _Analyzer(), store=InMemoryVectorStore()).process("s1", "1")
    assert outcome.startswith("failed: densenet vector has zero length"), outcome
    assert _reports(server) == [] and _task(server)["status"] == "failed"
