"""The job's embedding step: after the report, the image's row goes into the vector store; a
study whose report was written but whose row was not (the job stopped in between) gets the
row from its next job, with no second report."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from cxr_errors import FhirUnavailableError, InputError
from subscriptions.pipeline import AnalyzedImage, Pipeline
from tests.factories import make_analysis, make_heatmaps, make_png
from tests.fake_fhir import FakeFhir
from vector_store.records import EmbeddingRecord


class _Store:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], EmbeddingRecord] = {}
        self.down = False

    def upsert(self, record: EmbeddingRecord) -> None:
        if self.down:
            raise FhirUnavailableError("the vector store is down (a stand-in outage)")
        self.rows[(record.study_id, record.model_version)] = record

    def holds(self, study_id: str, model_version: str, image_sha256: str) -> bool:
        row = self.get(study_id, model_version)
        return row is not None and row.image_sha256 == image_sha256

    def get(self, study_id: str, model_version: str) -> EmbeddingRecord | None:
        return self.rows.get((study_id, model_version))


class _Analyzer:
    """Counts its passes; every image gets the same scores and embeddings."""

    model_version = "test-model"

    def __init__(self) -> None:
        self.passes = 0
        self.last_timings: dict[str, float] = {}

    def analyze(self, data: bytes, name: str) -> AnalyzedImage:
        self.passes += 1
        analysis = replace(
            make_analysis({"Effusion": 0.8}, model_version=self.model_version),
            features=np.ones(1024, dtype=np.float32),
        )
        clip = np.ones(512, dtype=np.float32)
        return AnalyzedImage(analysis, make_heatmaps(analysis), clip, "clip-test")

    def analyze_many(self, images: Sequence[tuple[bytes, str]]) -> list[AnalyzedImage | InputError]:
        return [self.analyze(d, n) for d, n in images]


@pytest.fixture
def server() -> FakeFhir:
    fake = FakeFhir()
    fake.put({"resourceType": "Patient", "id": "p1", "gender": "female"})
    fake.put(
        {
            "resourceType": "ImagingStudy",
            "id": "s1",
            "status": "available",
            "subject": {"reference": "Patient/p1"},
        }
    )
    png = base64.b64encode(make_png(width=16, height=16)).decode()
    fake.put(
        {
            "resourceType": "Media",
            "status": "completed",
            "partOf": [{"reference": "ImagingStudy/s1"}],
            "content": {"contentType": "image/png", "data": png},
        }
    )
    return fake


def test_a_reported_study_has_its_row(server: FakeFhir) -> None:
    pipeline = Pipeline(fhir=server.client(), analyzer=_Analyzer(), store=(store := _Store()))
    assert pipeline.process("s1", "1") == "reported"
    row = store.get("s1", "test-model")
    assert row is not None and row.clip is not None and row.clip_version == "clip-test"
    assert row.gender == "female" and row.positive_findings == ("Effusion",)


def test_a_report_without_its_embedding_row_gets_the_row_and_no_second_report(
    server: FakeFhir,
) -> None:
    analyzer, store = _Analyzer(), _Store()
    pipeline = Pipeline(fhir=server.client(), analyzer=analyzer, store=store)
    store.down = True
    with pytest.raises(FhirUnavailableError):  # retried by the queue
        pipeline.process("s1", "1")
    assert len(server.all("DiagnosticReport")) == 1 and store.rows == {}
    store.down = False
    assert pipeline.process("s1", "1") == "already reported (embedding restored)"
    assert len(server.all("DiagnosticReport")) == 1
    row = store.get("s1", "test-model")
    assert row is not None and row.clip is not None
    # with the row in place, a further notification costs no model pass
    assert pipeline.process("s1", "1") == "already reported"
    assert analyzer.passes == 2


def test_a_row_of_an_earlier_image_is_not_taken_for_this_one(server: FakeFhir) -> None:
    analyzer, store = _Analyzer(), _Store()
    pipeline = Pipeline(fhir=server.client(), analyzer=analyzer, store=store)
    assert pipeline.process("s1", "1") == "reported"
    row = store.get("s1", "test-model")
    assert row is not None
    store.rows[("s1", "test-model")] = replace(row, image_sha256="0" * 64)
    assert pipeline.process("s1", "1") == "already reported (embedding restored)"
    restored = store.get("s1", "test-model")
    assert restored is not None and restored.image_sha256 == row.image_sha256
