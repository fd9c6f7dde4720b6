"""``$similar`` end to end: NIH sample studies processed by the real pipeline, then searched
by study, text and image, at the service's FHIR base and through HAPI's — with credentials:
the service key (a trusted system caller) for most tests, and real SMART tokens from a
``cxr dev-ehr`` for what a patient or a user may see."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest

from fhir_service.ops.stack import (
    service_process,
    start_dev_ehr,
    start_service,
    start_workers,
    stop_dev_ehr,
    worker_process,
)
from fhir_service.settings import Settings
from tests.dev_ehr.smart_client import SmartClient
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
def corpus(stack: Stack) -> Iterator[Corpus]:
    AUTH["Authorization"] = f"Bearer {stack.settings.service_api_key}"
    built = Corpus(stack)
    with only_the_corpus_embedded(stack, built.ids):
        yield built


@contextmanager
def only_the_corpus_embedded(stack: Stack, ids: list[str]) -> Iterator[None]:
    """These tests expect every corpus study in a ``count=100`` answer, and the session's
    store holds the studies of every earlier test (hundreds in a full run, many of them the
    same NIH images, which tie at score 1.0). The other rows are set aside, in a temporary
    table of a connection held for the module, and put back after it, so that the answers
    are about the corpus alone. The worker stops meanwhile: its stuck sweep would find those
    reported studies missing from the index and store their embeddings again."""
    wait_for("the queue to drain", stack.drained, timeout_s=240)
    worker_process(stack.settings, 0).stop()
    try:
        with _set_aside(stack.dsn, ids):
            yield
    finally:
        start_workers(stack.settings, 1)


@contextmanager
def _set_aside(dsn: str, ids: list[str]) -> Iterator[None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TEMP TABLE set_aside AS SELECT * FROM study_embeddings"
            " WHERE NOT (study_id = ANY(%s))",
            (ids,),
        )
        conn.execute("DELETE FROM study_embeddings WHERE NOT (study_id = ANY(%s))", (ids,))
        try:
            yield
        finally:
            conn.execute(
                "INSERT INTO study_embeddings SELECT * FROM set_aside ON CONFLICT DO NOTHING"
            )


def service(stack: Stack) -> str:
    return f"{stack.settings.service_url}/fhir"


#: ``Authorization`` with the service's own key (set from the session's settings).
AUTH: dict[str, str] = {}


def get(url: str, **params: Any) -> httpx.Response:
    return httpx.get(url, params=params, headers=AUTH, timeout=60)


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


def test_a_study_entered_in_error_is_not_offered(corpus: Corpus) -> None:
    """Through HAPI as it is now, even before any job has taken the study out of the index
    (this module runs without a worker): entered in error may be another patient's image."""
    stack, query, wrong = corpus.stack, corpus.ids[0], corpus.ids[1]
    study = stack.fhir.read("ImagingStudy", wrong)
    stack.fhir.update({**study, "status": "entered-in-error"})
    try:
        r = get(f"{service(stack)}/ImagingStudy/{query}/$similar", count=100)
        assert r.status_code == 200, r.text
        assert set(ours(r.json(), corpus)) == set(corpus.ids) - {query, wrong}
        r = get(f"{service(stack)}/ImagingStudy/{wrong}/$similar")
        assert r.status_code == 422, r.text
        assert "entered-in-error" in r.json()["issue"][0]["diagnostics"]
    finally:
        stack.fhir.update({**stack.fhir.read("ImagingStudy", wrong), "status": "available"})


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
    r = httpx.post(url, json=body, headers=AUTH, timeout=120)
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
    r = httpx.post(
        url, json=image_parameters(b"%PDF-1.4", "application/pdf"), headers=AUTH, timeout=30
    )
    assert r.status_code == 400
    assert "contentType" in r.json()["issue"][0]["diagnostics"]
    bare = corpus.stack.post_study(8, image=None)  # no worker here (see the fixture)
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


# --- who may call $similar, and what they see (issue 13) --------------------------------------


def _bases(stack: Stack) -> list[str]:
    return [service(stack), stack.settings.fhir_base_url]


def test_similar_needs_credentials_everywhere_it_is_served(corpus: Corpus) -> None:
    """Issue 13: $similar answered anyone who reached the port (or HAPI's base), with
    studies of every patient."""
    text = {"resourceType": "Parameters", "parameter": [{"name": "text", "valueString": "x"}]}
    for base in _bases(corpus.stack):
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic eDp5"}):
            answers = [
                httpx.get(f"{base}/ImagingStudy/{corpus.ids[0]}/$similar", headers=headers),
                httpx.get(f"{base}/ImagingStudy/$similar?text=x", headers=headers),
                httpx.post(f"{base}/ImagingStudy/$similar", json=text, headers=headers, timeout=60),
            ]
            for r in answers:
                assert r.status_code == 401, (base, headers, r.text)
                assert r.json()["resourceType"] == "OperationOutcome"
                assert r.headers["www-authenticate"].startswith("Bearer")


def test_post_parameters_are_forwarded_by_hapi(corpus: Corpus) -> None:
    """Issue 13: HAPI's forwarder lost the POST body (→ 400)."""
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "text", "valueString": "left pleural effusion"},
            {"name": "count", "valueInteger": 7},
        ],
    }
    # A long timeout: the service may just have been restarted (the 503 test) and loads CLIP
    # again on its first text query.
    direct = httpx.post(
        f"{service(corpus.stack)}/ImagingStudy/$similar", json=body, headers=AUTH, timeout=300
    )
    via_hapi = httpx.post(
        f"{corpus.stack.settings.fhir_base_url}/ImagingStudy/$similar",
        json=body,
        headers={**AUTH, "Content-Type": "application/fhir+json"},
        timeout=300,
    )
    assert direct.status_code == 200, direct.text
    assert via_hapi.status_code == 200, via_hapi.text
    assert via_hapi.json() == direct.json()
    assert len(via_hapi.json()["entry"]) == 7


@pytest.fixture(scope="module")
def dev_ehr(corpus: Corpus, test_settings: Settings) -> Iterator[SmartClient]:
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    settings = test_settings.model_copy(
        update={
            "data_dir": test_settings.data_dir / "dev-ehr-similar",
            "dev_ehr_port": 18007 + offset,
        }
    )
    stop_dev_ehr(settings)
    start_dev_ehr(settings)
    try:
        with httpx.Client(base_url=settings.dev_ehr_url, timeout=60) as http:
            yield SmartClient(
                http,
                iss=settings.dev_ehr_fhir_url,
                redirect_uri=f"{settings.service_url}/app/callback",
            )
    finally:
        stop_dev_ehr(settings)


def _patient_of(stack: Stack, study: str) -> str:
    return str(stack.fhir.read("ImagingStudy", study)["subject"]["reference"]).split("/")[-1]


def test_a_patient_token_sees_its_own_patients_studies_only(
    corpus: Corpus, dev_ehr: SmartClient
) -> None:
    stack = corpus.stack
    query = corpus.ids[1]  # NIH patient 13: four more studies in the corpus
    patient = _patient_of(stack, query)
    theirs = {str(s["id"]) for s in stack.fhir.search_all("ImagingStudy", {"patient": patient})}
    token = dev_ehr.ehr_launch_token(patient)["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    for base in _bases(stack):
        found = httpx.get(
            f"{base}/ImagingStudy/{query}/$similar", params={"count": 100}, headers=bearer
        )
        assert found.status_code == 200, found.text
        ids = {e["resource"]["id"] for e in found.json()["entry"]}
        assert ids == theirs - {query}
        by_text = httpx.get(
            f"{base}/ImagingStudy/$similar",
            params={"text": "effusion", "count": 100},
            headers=bearer,
        )
        assert {e["resource"]["id"] for e in by_text.json()["entry"]} == theirs
        other = next(sid for sid in corpus.ids if _patient_of(stack, sid) != patient)
        refused = httpx.get(f"{base}/ImagingStudy/{other}/$similar", headers=bearer)
        assert refused.status_code == 403, refused.text
        widened = httpx.get(
            f"{base}/ImagingStudy/$similar",
            params={"text": "x", "patient": _patient_of(stack, other)},
            headers=bearer,
        )
        assert widened.status_code == 403
    # And through the dev EHR's own proxy, the way the app calls it.
    proxied = dev_ehr.fhir(f"ImagingStudy/{query}/$similar?count=100", token)
    assert proxied.status_code == 200, proxied.text
    assert {e["resource"]["id"] for e in proxied.json()["entry"]} == theirs - {query}


def test_a_user_token_sees_every_patient_and_a_revoked_grant_nothing(
    corpus: Corpus, dev_ehr: SmartClient
) -> None:
    token = dev_ehr.user_launch_token()
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    found = httpx.get(
        f"{service(corpus.stack)}/ImagingStudy/{corpus.ids[0]}/$similar",
        params={"count": 100},
        headers=bearer,
    )
    assert found.status_code == 200, found.text
    assert set(ours(found.json(), corpus)) == set(corpus.ids) - {corpus.ids[0]}
    # The dev EHR's proxy knows about revocation (a replayed refresh token); the service,
    # checking signatures only, does not: introspection is the way to learn it.
    dev_ehr.refresh(token["refresh_token"])
    dev_ehr.refresh(token["refresh_token"])  # replay: the grant is revoked
    revoked = dev_ehr.fhir(f"ImagingStudy/{corpus.ids[0]}/$similar", token["access_token"])
    assert revoked.status_code == 401
