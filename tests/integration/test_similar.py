"""``$similar`` end to end: NIH sample studies processed by the real pipeline, then searched
by study, text and image, at the service's FHIR base and through HAPI's."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import psycopg
import pytest

from fhir_service.ops.stack import service_process, start_service
from tests.factories import unique_suffix
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

#: Sample rows: 1-5 are one patient (NIH 13), the rest other patients of both sexes.
INDICES = list(range(12))


class Corpus:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        tag = unique_suffix()
        self.ids = [stack.post_study(i, tag=tag) for i in INDICES]
        self.records = {sid: stack.records[i] for sid, i in zip(self.ids, INDICES, strict=True)}
        wait_for("all reports", lambda: all(stack.reports(sid) for sid in self.ids), 300)
        wait_for("all embeddings", lambda: self.embedded() == len(self.ids), 60)

    def embedded(self) -> int:
        with psycopg.connect(self.stack.dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM study_embeddings WHERE study_id = ANY(%s)", (self.ids,)
            ).fetchone()
        return int(row[0]) if row else 0

    def positives(self, sid: str) -> set[str]:
        with psycopg.connect(self.stack.dsn) as conn:
            row = conn.execute(
                "SELECT positive_findings FROM study_embeddings WHERE study_id = %s", (sid,)
            ).fetchone()
        return set(row[0]) if row else set()


@pytest.fixture(scope="module")
def corpus(stack: Stack) -> Corpus:
    return Corpus(stack)


def service(stack: Stack) -> str:
    return f"{stack.settings.service_url}/fhir"


def get(url: str, **params: Any) -> httpx.Response:
    return httpx.get(url, params=params, timeout=60)


def ours(bundle: dict[str, Any], corpus: Corpus) -> list[str]:
    return [e["resource"]["id"] for e in bundle["entry"] if e["resource"]["id"] in corpus.ids]


def check_bundle(bundle: dict[str, Any]) -> list[float]:
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    scores = []
    for entry in bundle["entry"]:
        assert entry["resource"]["resourceType"] == "ImagingStudy"
        assert entry["search"]["mode"] == "match"
        scores.append(entry["search"]["score"])
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    return scores


def test_similar_to_a_study_ranks_other_studies(corpus: Corpus) -> None:
    query = corpus.ids[0]
    r = get(f"{service(corpus.stack)}/ImagingStudy/{query}/$similar", count=100)
    assert r.status_code == 200, r.text
    bundle = r.json()
    check_bundle(bundle)
    found = ours(bundle, corpus)
    assert query not in found
    assert set(found) == set(corpus.ids) - {query}


def test_exclude_same_patient(corpus: Corpus) -> None:
    query = corpus.ids[1]  # NIH patient 13, who has four more studies in the corpus
    same_patient = set(corpus.ids[2:6])
    url = f"{service(corpus.stack)}/ImagingStudy/{query}/$similar"
    with_them = set(ours(get(url, count=100).json(), corpus))
    assert same_patient <= with_them
    without = set(ours(get(url, count=100, **{"exclude-same-patient": "true"}).json(), corpus))
    assert not (same_patient & without)
    assert without


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({"gender": "female"}, lambda rec: rec.sex == "female"),
        ({"view-position": "AP"}, lambda rec: rec.view_position == "AP"),
        ({"age-min": "50", "age-max": "60"}, lambda rec: 50 <= rec.age_years <= 60),
    ],
)
def test_filters_are_honoured(corpus: Corpus, params: dict[str, str], keep: Any) -> None:
    query = corpus.ids[0]
    url = f"{service(corpus.stack)}/ImagingStudy/{query}/$similar"
    found = ours(get(url, count=100, **params).json(), corpus)
    expected = {sid for sid in corpus.ids if sid != query and keep(corpus.records[sid])}
    assert set(found) == expected


def test_finding_filter(corpus: Corpus) -> None:
    positives = {sid: corpus.positives(sid) for sid in corpus.ids}
    counts: dict[str, int] = {}
    for found in positives.values():
        for label in found:
            counts[label] = counts.get(label, 0) + 1
    label = max(counts, key=lambda k: counts[k])
    query = corpus.ids[0]
    url = f"{service(corpus.stack)}/ImagingStudy/{query}/$similar"
    found = ours(get(url, count=100, finding=label).json(), corpus)
    assert set(found) == {sid for sid, p in positives.items() if label in p and sid != query}


def test_same_bundle_through_hapi(corpus: Corpus) -> None:
    query = corpus.ids[3]
    params = {"count": "5", "exclude-same-patient": "true"}
    direct = get(f"{service(corpus.stack)}/ImagingStudy/{query}/$similar", **params)
    via_hapi = get(f"{corpus.stack.settings.fhir_base_url}/ImagingStudy/{query}/$similar", **params)
    assert via_hapi.status_code == 200, via_hapi.text
    assert via_hapi.json() == direct.json()
    text = get(
        f"{corpus.stack.settings.fhir_base_url}/ImagingStudy/$similar", text="pleural effusion"
    )
    assert text.status_code == 200, text.text
    check_bundle(text.json())


def test_text_query_is_deterministic_and_filtered(corpus: Corpus) -> None:
    url = f"{service(corpus.stack)}/ImagingStudy/$similar"
    first = get(url, text="left pleural effusion", count=100).json()
    second = get(url, text="left pleural effusion", count=100).json()
    assert first == second
    check_bundle(first)
    assert set(ours(first, corpus)) == set(corpus.ids)
    women = ours(get(url, text="left pleural effusion", count=100, gender="female").json(), corpus)
    assert set(women) == {sid for sid in corpus.ids if corpus.records[sid].sex == "female"}
    other = get(url, text="enlarged heart", count=100).json()
    assert [e["search"]["score"] for e in other["entry"]] != [
        e["search"]["score"] for e in first["entry"]
    ]


def image_parameters(data: bytes, content_type: str, **extra: Any) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {
            "name": "image",
            "valueAttachment": {
                "contentType": content_type,
                "data": base64.b64encode(data).decode(),
            },
        }
    ]
    params += [{"name": k, "valueInteger": v} for k, v in extra.items()]
    return {"resourceType": "Parameters", "parameter": params}


@pytest.mark.parametrize("space", ["clip", "densenet"])
def test_image_query(corpus: Corpus, space: str) -> None:
    rec = corpus.stack.records[7]
    png = (corpus.stack.settings.shared_dir / "data" / "nih-sample" / rec.image_index).read_bytes()
    url = f"{service(corpus.stack)}/ImagingStudy/$similar?space={space}"
    body = image_parameters(png, "image/png", count=10)
    r = httpx.post(url, json=body, timeout=120)
    assert r.status_code == 200, r.text
    scores = check_bundle(r.json())
    assert len(scores) == 10
    # The same image was processed as corpus.ids[7] (and maybe by other tests of the
    # session, as other studies): it is among the identical nearest neighbours.
    identical = {e["resource"]["id"] for e in r.json()["entry"] if e["search"]["score"] > 0.99}
    assert corpus.ids[7] in identical


@pytest.mark.parametrize(
    ("path", "params", "status", "text"),
    [
        ("ImagingStudy/{id}/$similar", {"count": "0"}, 400, "count"),
        ("ImagingStudy/{id}/$similar", {"count": "100000"}, 400, "count"),
        ("ImagingStudy/{id}/$similar", {"space": "pixels"}, 400, "space"),
        ("ImagingStudy/$similar", {"text": "x" * 10_000}, 400, "10000 characters"),
        ("ImagingStudy/no-such-study/$similar", {}, 404, "ImagingStudy/no-such-study"),
    ],
)
def test_bad_requests_get_operation_outcomes(
    corpus: Corpus, path: str, params: dict[str, str], status: int, text: str
) -> None:
    for base in (service(corpus.stack), corpus.stack.settings.fhir_base_url):
        r = get(f"{base}/{path.format(id=corpus.ids[0])}", **params)
        assert r.status_code == status, r.text
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert text in outcome["issue"][0]["diagnostics"]


def test_non_image_attachment_and_study_without_embedding(corpus: Corpus) -> None:
    url = f"{service(corpus.stack)}/ImagingStudy/$similar"
    r = httpx.post(url, json=image_parameters(b"%PDF-1.4", "application/pdf"), timeout=30)
    assert r.status_code == 400
    assert "contentType" in r.json()["issue"][0]["diagnostics"]
    bare = corpus.stack.post_study(8, image=None)
    wait_for("its failed Task", lambda: corpus.stack.task(bare))
    r = get(f"{service(corpus.stack)}/ImagingStudy/{bare}/$similar")
    assert r.status_code == 422
    assert "no clip embedding" in r.json()["issue"][0]["diagnostics"]


def test_operation_is_published(corpus: Corpus) -> None:
    cap = get(f"{service(corpus.stack)}/metadata").json()
    ops = cap["rest"][0]["resource"][0]["operation"]
    assert ops[0]["name"] == "similar"
    opdef = get(ops[0]["definition"]).json()
    assert opdef["code"] == "similar" and opdef["instance"] and opdef["type"]
    assert opdef["affectsState"] is False
    hapi_cap = get(f"{corpus.stack.settings.fhir_base_url}/metadata").json()
    study = next(r for r in hapi_cap["rest"][0]["resource"] if r["type"] == "ImagingStudy")
    assert any(op["name"] == "similar" for op in study.get("operation", []))


def test_hapi_answers_503_when_the_service_is_down(corpus: Corpus) -> None:
    settings = corpus.stack.settings
    service_process(settings).stop()
    try:
        r = get(f"{settings.fhir_base_url}/ImagingStudy/{corpus.ids[0]}/$similar")
        assert r.status_code == 503
        assert r.json()["resourceType"] == "OperationOutcome"
    finally:
        start_service(settings)
