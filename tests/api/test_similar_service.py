"""``$similar``'s service logic through the store Protocol, with the in-memory store, a fake
FHIR server and a fake query encoder: no PostgreSQL, no model."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from cxr_errors import NotFoundError
from fhir_service.fhir.client import FhirClient
from fhir_service.similar import SimilarService, Unprocessable, parse_query
from vector_store.memory import InMemoryVectorStore
from vector_store.records import EmbeddingRecord

BASE = "http://fhir.test/fhir"
MODEL = "model-v1"
CLIP = "clip-v1"


def _unit(i: int, dim: int = 512) -> npt.NDArray[np.float32]:
    v = np.zeros(dim, np.float32)
    v[0] = 1.0
    v[1 + i] = 0.1 * i  # study i drifts away from the first axis as i grows
    return v


def _study(sid: str, patient: str) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": sid,
        "status": "available",
        "subject": {"reference": f"Patient/{patient}"},
    }


STUDIES = {f"s{i}": _study(f"s{i}", "p1" if i < 3 else "p2") for i in range(6)} | {
    sid: _study(sid, "p3") for sid in ("s10", "s11")
}


def _fhir() -> FhirClient:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir/")
        if path.startswith("ImagingStudy/"):
            sid = path.split("/")[1]
            if sid in STUDIES:
                return httpx.Response(200, json=STUDIES[sid])
            return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})
        ids = request.url.params.get("_id", "").split(",")
        entries = [{"resource": STUDIES[i]} for i in ids if i in STUDIES]
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": entries})

    return FhirClient(BASE, transport=httpx.MockTransport(handler))


class _Encoder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def text(self, text: str) -> npt.NDArray[np.float32]:
        self.calls.append(f"text:{text}")
        return _unit(0)

    def image(self, data: bytes, space: str) -> npt.NDArray[np.float32]:
        self.calls.append(f"image:{space}")
        return _unit(5)

    def clip_version(self) -> str:
        return CLIP


@pytest.fixture
def service() -> SimilarService:
    store = InMemoryVectorStore()
    for i in range(6):
        store.upsert(
            EmbeddingRecord(
                study_id=f"s{i}",
                model_version=MODEL,
                study_version_id="1",
                clip=_unit(i),
                clip_version=CLIP,
                patient_id="p1" if i < 3 else "p2",
                gender="female" if i % 2 else "male",
                age=40 + i,
                view_position="PA",
                positive_findings=("Effusion",) if i == 4 else (),
            )
        )
    # An embedding of another model must never be returned.
    store.upsert(EmbeddingRecord("s9", "model-v0", "1", clip=_unit(0), patient_id="p9"))
    # Nor one of another CLIP version under the same DenseNet version, nor one of unknown CLIP
    # version (stored before versions were recorded).
    store.upsert(EmbeddingRecord("s10", MODEL, "1", clip=_unit(1), clip_version="clip-v0"))
    store.upsert(EmbeddingRecord("s11", MODEL, "1", clip=_unit(1), densenet=np.ones(1024)))
    return SimilarService(fhir=_fhir(), store=store, model_version=MODEL, encoder=_Encoder())


def _ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle["entry"]]


def test_by_study_ranks_neighbours_and_leaves_the_study_out(service: SimilarService) -> None:
    bundle = service.run(parse_query({"count": "3"}, study_id="s0"), BASE)
    assert _ids(bundle) == ["s1", "s2", "s3"]
    scores = [e["search"]["score"] for e in bundle["entry"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert bundle["entry"][0]["fullUrl"] == f"{BASE}/ImagingStudy/s1"
    assert service.encoder.calls == []  # type: ignore[attr-defined]


def test_exclude_same_patient(service: SimilarService) -> None:
    q = parse_query({"exclude-same-patient": "true"}, study_id="s0")
    assert _ids(service.run(q, BASE)) == ["s3", "s4", "s5"]


def test_filters_reach_the_store(service: SimilarService) -> None:
    q = parse_query({"gender": "female", "finding": "effusion"}, study_id="s0")
    assert _ids(service.run(q, BASE)) == []
    q = parse_query({"finding": "Effusion"}, study_id="s0")
    assert _ids(service.run(q, BASE)) == ["s4"]
    q = parse_query({"age-min": "44"}, study_id="s0")
    assert _ids(service.run(q, BASE)) == ["s4", "s5"]


def test_text_and_image_queries_use_the_encoder(service: SimilarService) -> None:
    assert _ids(service.run(parse_query({"text": "effusion", "count": "1"}), BASE)) == ["s0"]
    image = parse_query({"count": "1"}, image=b"png", image_type="image/png")
    assert _ids(service.run(image, BASE)) == ["s5"]
    assert service.encoder.calls == ["text:effusion", "image:clip"]  # type: ignore[attr-defined]


def test_a_withdrawn_study_is_neither_offered_nor_searched_from(
    service: SimilarService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its row may outlive the withdrawal a moment (until its job takes it out of the index):
    the study as it is now decides. Entered in error may mean another patient's images."""
    monkeypatch.setitem(STUDIES, "s1", {**STUDIES["s1"], "status": "entered-in-error"})
    monkeypatch.setitem(STUDIES, "s2", {**STUDIES["s2"], "status": "cancelled"})
    assert _ids(service.run(parse_query({"count": "3"}, study_id="s0"), BASE)) == ["s3"]
    with pytest.raises(Unprocessable, match="s1 is entered-in-error: a withdrawn study"):
        service.run(parse_query({}, study_id="s1"), BASE)


def test_unknown_study_is_404_and_unembedded_is_422(service: SimilarService) -> None:
    with pytest.raises(NotFoundError):
        service.run(parse_query({}, study_id="nope"), BASE)
    STUDIES["s8"] = _study("s8", "p3")
    try:
        with pytest.raises(Unprocessable) as raised:
            service.run(parse_query({}, study_id="s8"), BASE)
        assert raised.value.http_status == 422
    finally:
        del STUDIES["s8"]


def test_clip_neighbours_share_the_query_clip_version(service: SimilarService) -> None:
    found = _ids(service.run(parse_query({"count": "10"}, study_id="s0"), BASE))
    assert found == ["s1", "s2", "s3", "s4", "s5"]  # not s10 (CLIP v0) nor s11 (unknown)
    text = _ids(service.run(parse_query({"text": "effusion", "count": "10"}), BASE))
    assert "s10" not in text and "s11" not in text


def test_a_study_of_unknown_clip_version_is_refused_in_clip_space(service: SimilarService) -> None:
    with pytest.raises(Unprocessable, match="without its CLIP version"):
        service.run(parse_query({}, study_id="s11"), BASE)
    # the densenet space does not depend on CLIP
    assert service.run(parse_query({"space": "densenet"}, study_id="s11"), BASE)["entry"] == []


def test_an_untrained_clip_tags_the_answer() -> None:
    store = InMemoryVectorStore()
    version = "untrained-ViT-B-32-seed0@abc"
    store.upsert(EmbeddingRecord("s0", MODEL, "1", clip=_unit(0), clip_version=version))
    store.upsert(EmbeddingRecord("s1", MODEL, "1", clip=_unit(1), clip_version=version))
    service = SimilarService(fhir=_fhir(), store=store, model_version=MODEL, encoder=_Encoder())
    bundle = service.run(parse_query({}, study_id="s0"), BASE)
    assert _ids(bundle) == ["s1"]
    (tag,) = bundle["meta"]["tag"]
    assert tag["code"] == "untrained" and "UNTRAINED" in tag["display"]
    trained = service.run(parse_query({"text": "x"}), BASE)  # the encoder's CLIP-v1
    assert "meta" not in trained
