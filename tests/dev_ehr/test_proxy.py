"""The dev EHR's FHIR proxy: only valid tokens (401 otherwise), only the token's patient
compartment (403 outside) or, for a user-level token, the types its user/ scopes grant;
reads and searches only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import RSAKey
from joserfc.jws import extract_compact

from fhir_service.dev_ehr import build_ehr, create_app
from fhir_service.dev_ehr.proxy import Access, filter_bundle
from fhir_service.dev_ehr.tokens import AccessClaims
from fhir_service.settings import Settings
from tests.dev_ehr.conftest import APP, DEV_EHR, FakeClock, FakeHapi
from tests.dev_ehr.smart_client import SmartClient

PREFIX = {
    "ImagingStudy": "study",
    "DiagnosticReport": "report",
    "Observation": "obs",
    "Media": "media",
}


@pytest.fixture
def p1_token(smart: SmartClient) -> str:
    token: str = smart.ehr_launch_token("p1")["access_token"]
    return token


def _assert_401(resp: Any, error: str | None = "invalid_token") -> None:
    assert resp.status_code == 401, resp.text
    challenge = resp.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="cxr-dev-ehr"')
    if error:
        assert f'error="{error}"' in challenge
    assert resp.json()["resourceType"] == "OperationOutcome"


def test_missing_token_is_401(smart: SmartClient) -> None:
    resp = smart.fhir("Patient/p1", None)
    _assert_401(resp, error=None)
    assert "error=" not in resp.headers["www-authenticate"]


@pytest.mark.parametrize("token", ["garbage", "a.b.c", ""])
def test_malformed_token_is_401(smart: SmartClient, token: str) -> None:
    resp = smart.http.get(f"{smart.iss}/Patient/p1", headers={"Authorization": f"Bearer {token}"})
    _assert_401(resp, error="invalid_token" if token else None)


def test_token_signed_by_another_key_is_401(smart: SmartClient, p1_token: str) -> None:
    forged_key = RSAKey.generate_key(2048, parameters={"alg": "RS256"})
    original = extract_compact(p1_token.encode())
    forged = jwt.encode(
        {"alg": "RS256", "typ": "at+jwt", "kid": original.headers()["kid"]},
        json.loads(original.payload),
        forged_key,
    )
    _assert_401(smart.fhir("Patient/p1", forged))


def test_unsigned_token_is_401(smart: SmartClient, p1_token: str) -> None:
    header, payload, _ = p1_token.split(".")
    _assert_401(smart.fhir("Patient/p1", f"{header}.{payload}."))


def test_expired_token_is_401(smart: SmartClient, p1_token: str, clock: FakeClock) -> None:
    assert smart.fhir("Patient/p1", p1_token).status_code == 200
    clock.advance(3601)
    _assert_401(smart.fhir("Patient/p1", p1_token))


def test_id_token_is_not_an_access_token(smart: SmartClient) -> None:
    token = smart.ehr_launch_token("p1")
    _assert_401(smart.fhir("Patient/p1", token["id_token"]))


def test_other_patient_is_403(smart: SmartClient, p1_token: str) -> None:
    for path in (
        "Patient/p2",
        "ImagingStudy/study-p2",
        "DiagnosticReport/report-p2",
        "Observation/obs-p2",
        "Media/media-p2",
        "ImagingStudy/study-p2/_history/1",
        "ImagingStudy?patient=p2",
        "ImagingStudy?subject=Patient/p2",
        "Observation?patient=p1,p2",
        "Observation?subject:Patient=p2",
        f"DiagnosticReport?patient={DEV_EHR}/fhir/Patient/p2",
        "Patient?_id=p2",
        "ImagingStudy/study-p2/$similar",
    ):
        resp = smart.fhir(path, p1_token)
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["issue"][0]["code"] == "forbidden"


def test_a_token_for_another_patient_cannot_read_that_patient(smart: SmartClient) -> None:
    p2_token = smart.standalone_token("p2")["access_token"]
    assert smart.fhir("Patient/p1", p2_token).status_code == 403
    assert smart.fhir("ImagingStudy/study-p1", p2_token).status_code == 403
    assert smart.fhir("ImagingStudy/study-p2", p2_token).status_code == 200


def test_own_compartment_reads_and_searches(smart: SmartClient, p1_token: str) -> None:
    for path in (
        "Patient/p1",
        "ImagingStudy/study-p1",
        "DiagnosticReport/report-p1",
        "Observation/obs-p1",
        "Media/media-p1",
    ):
        assert smart.fhir(path, p1_token).status_code == 200, path
    for rtype in ("ImagingStudy", "DiagnosticReport", "Observation", "Media"):
        for query in ("", "?patient=p1", "?subject=Patient/p1", "?patient=Patient/p1"):
            bundle = smart.fhir(f"{rtype}{query}", p1_token).json()
            assert [e["resource"]["id"] for e in bundle["entry"]] == [f"{PREFIX[rtype]}-p1"], (
                rtype,
                query,
            )
    patients = smart.fhir("Patient", p1_token).json()
    assert [e["resource"]["id"] for e in patients["entry"]] == ["p1"]


def test_search_without_patient_gets_it_added(
    smart: SmartClient, p1_token: str, fake_hapi: FakeHapi
) -> None:
    smart.fhir("Observation?code=x", p1_token)
    sent = fake_hapi.requests[-1].url.params
    assert sent.get_list("patient") == ["p1"]
    assert sent["code"] == "x"


@pytest.mark.parametrize(
    "query",
    [
        "Observation?patient.name=x",
        "Observation?patient:missing=true",
        "Observation?_has:DiagnosticReport:result:status=final",
        "Device",
        "Device/model",
        "Practitioner/x",
        "Patient/$everything",
        "Patient/p1/$everything",
        "ImagingStudy/_history",
        "",
    ],
)
def test_reads_the_proxy_does_not_serve_are_403(
    smart: SmartClient, p1_token: str, query: str
) -> None:
    assert smart.fhir(query, p1_token).status_code == 403, query


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_writes_are_refused(
    smart: SmartClient, p1_token: str, fake_hapi: FakeHapi, method: str
) -> None:
    before = len(fake_hapi.requests)
    path = "Observation" if method == "POST" else "Observation/obs-p1"
    resp = smart.fhir(path, p1_token, method=method, json={"resourceType": "Observation"})
    assert resp.status_code == 403
    assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    assert len(fake_hapi.requests) == before, "a refused write never reaches HAPI"


def test_scopes_limit_resource_types(smart: SmartClient) -> None:
    token = smart.ehr_launch_token("p1", scope="launch patient/Observation.rs")["access_token"]
    assert smart.fhir("Observation", token).status_code == 200
    assert smart.fhir("ImagingStudy", token).status_code == 403
    assert smart.fhir("Patient/p1", token).status_code == 403
    read_only = smart.ehr_launch_token("p1", scope="launch patient/Observation.r")["access_token"]
    assert smart.fhir("Observation/obs-p1", read_only).status_code == 200
    assert smart.fhir("Observation", read_only).status_code == 403


def test_token_without_resource_scopes_is_403(smart: SmartClient) -> None:
    token = smart.ehr_launch_token("p1", scope="openid fhirUser")
    assert "patient" in token  # the launch still names the patient
    resp = smart.fhir("Patient/p1", token["access_token"])
    assert resp.status_code == 403


def test_similar_is_filtered_to_the_compartment(smart: SmartClient, p1_token: str) -> None:
    own = smart.fhir("ImagingStudy/study-p1/$similar?count=5", p1_token)
    assert own.status_code == 200
    assert [e["resource"]["id"] for e in own.json()["entry"]] == ["study-p1"]
    assert "total" not in own.json()
    text = smart.fhir(
        "ImagingStudy/$similar",
        p1_token,
        method="POST",
        json={"resourceType": "Parameters", "parameter": [{"name": "text", "valueString": "x"}]},
    )
    assert text.status_code == 200
    assert [e["resource"]["id"] for e in text.json()["entry"]] == ["study-p1"]


def test_metadata_needs_no_token_and_names_the_oauth_endpoints(smart: SmartClient) -> None:
    cap = smart.fhir("metadata", None)
    assert cap.status_code == 200
    ext = cap.json()["rest"][0]["security"]["extension"][0]
    uris = {e["url"]: e["valueUri"] for e in ext["extension"]}
    assert uris == {"authorize": f"{DEV_EHR}/auth/authorize", "token": f"{DEV_EHR}/auth/token"}


def test_unknown_resource_is_404(smart: SmartClient, p1_token: str) -> None:
    assert smart.fhir("ImagingStudy/nope", p1_token).status_code == 404


def test_hapi_down_is_502_not_500(smart: SmartClient, p1_token: str, fake_hapi: FakeHapi) -> None:
    fake_hapi.down = True
    resp = smart.fhir("Patient/p1", p1_token)
    assert resp.status_code == 502
    assert resp.json()["issue"][0]["code"] == "transient"
    assert smart.fhir("metadata", None).status_code == 502
    assert smart.http.get("/launch").status_code == 502
    assert smart.http.get("/launch/ehr", params={"patient": "p1"}).status_code == 502


# --- user-level tokens (an EHR launch with no patient: user/ scopes) ---------------------------


@pytest.fixture
def user_token(smart: SmartClient) -> str:
    token = smart.user_launch_token()
    assert "patient" not in token
    access: str = token["access_token"]
    return access


def test_user_token_reads_and_searches_across_patients(
    smart: SmartClient, user_token: str, fake_hapi: FakeHapi
) -> None:
    for pid in ("p1", "p2"):
        for path in (f"Patient/{pid}", f"ImagingStudy/study-{pid}", f"Observation/obs-{pid}"):
            assert smart.fhir(path, user_token).status_code == 200, path
    studies = smart.fhir("ImagingStudy", user_token).json()
    assert sorted(e["resource"]["id"] for e in studies["entry"]) == ["study-p1", "study-p2"]
    assert "patient" not in fake_hapi.requests[-1].url.params, "no compartment is bound"
    # Naming a patient is an ordinary search, not a compartment check.
    one = smart.fhir("DiagnosticReport?patient=p2", user_token).json()
    assert [e["resource"]["id"] for e in one["entry"]] == ["report-p2"]


def test_user_token_similar_is_not_filtered(smart: SmartClient, user_token: str) -> None:
    for path in ("ImagingStudy/study-p2/$similar?count=5", "ImagingStudy/$similar?text=x"):
        resp = smart.fhir(path, user_token)
        assert resp.status_code == 200, resp.text
        ids = sorted(e["resource"]["id"] for e in resp.json()["entry"])
        assert ids == ["study-p1", "study-p2"], path


def test_user_token_is_403_for_types_not_granted(smart: SmartClient) -> None:
    token = smart.user_launch_token(scope="launch user/ImagingStudy.rs")["access_token"]
    assert smart.fhir("ImagingStudy/study-p2", token).status_code == 200
    for path in ("Patient/p1", "Observation", "Observation/obs-p2", "Device/model", "Device"):
        resp = smart.fhir(path, token)
        assert resp.status_code == 403, path
        assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    # v2 permissions count: read without search is no search.
    read_only = smart.user_launch_token(scope="launch user/ImagingStudy.r")["access_token"]
    assert smart.fhir("ImagingStudy/study-p1", read_only).status_code == 200
    assert smart.fhir("ImagingStudy", read_only).status_code == 403


def test_user_token_chains_only_through_granted_types(
    smart: SmartClient, user_token: str, fake_hapi: FakeHapi
) -> None:
    assert smart.fhir("ImagingStudy?patient:Patient.gender=male", user_token).status_code == 200
    typed = "DiagnosticReport?result:Observation.derived-from=ImagingStudy/study-p1"
    assert smart.fhir(typed, user_token).status_code == 200
    assert fake_hapi.requests[-1].url.params["result:Observation.derived-from"] == (
        "ImagingStudy/study-p1"
    )
    # An untyped link could lead anywhere: refused before HAPI sees it.
    before = len(fake_hapi.requests)
    assert smart.fhir("ImagingStudy?patient.gender=male", user_token).status_code == 403
    narrow = smart.user_launch_token(scope="launch user/ImagingStudy.rs")["access_token"]
    assert smart.fhir("ImagingStudy?patient:Patient.gender=male", narrow).status_code == 403
    assert len(fake_hapi.requests) == before


@pytest.mark.parametrize(
    "query",
    [
        "Observation?_has:DiagnosticReport:result:status=final",
        "Observation?_filter=status eq final",
        "Observation?_query=x",
        "Observation?_contained=true",
        "Patient/$everything",
        "Patient/p1/$everything",
        "ImagingStudy/_history",
        "",
    ],
)
def test_user_token_refusals_that_are_not_about_the_compartment(
    smart: SmartClient, user_token: str, query: str
) -> None:
    assert smart.fhir(query, user_token).status_code == 403, query


def test_user_token_format_is_dropped(
    smart: SmartClient, user_token: str, fake_hapi: FakeHapi
) -> None:
    assert smart.fhir("ImagingStudy?_format=xml&_pretty=true", user_token).status_code == 200
    sent = fake_hapi.requests[-1].url.params
    assert "_format" not in sent and "_pretty" not in sent


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_user_token_writes_are_refused(
    smart: SmartClient, user_token: str, fake_hapi: FakeHapi, method: str
) -> None:
    before = len(fake_hapi.requests)
    path = "Observation" if method == "POST" else "Observation/obs-p2"
    resp = smart.fhir(path, user_token, method=method, json={"resourceType": "Observation"})
    assert resp.status_code == 403
    assert len(fake_hapi.requests) == before


def test_user_token_expires_and_is_revocable(
    smart: SmartClient, user_token: str, clock: FakeClock
) -> None:
    assert smart.fhir("Patient/p2", user_token).status_code == 200
    clock.advance(3601)
    _assert_401(smart.fhir("Patient/p2", user_token))


def test_token_without_patient_or_user_scopes_is_403(smart: SmartClient) -> None:
    token = smart.user_launch_token(scope="launch openid fhirUser patient/Patient.rs")
    assert token["scope"].split() == ["launch", "openid", "fhirUser"]
    resp = smart.fhir("Patient/p1", token["access_token"])
    assert resp.status_code == 403
    assert "no user/ scopes" in resp.json()["issue"][0]["diagnostics"]


def test_bundle_filter_drops_types_not_granted_and_keeps_other_patients() -> None:
    bundle = {
        "resourceType": "Bundle",
        "total": 3,
        "entry": [
            {
                "resource": {
                    "resourceType": "ImagingStudy",
                    "id": "s1",
                    "subject": {"reference": "Patient/p1"},
                }
            },
            {
                "resource": {
                    "resourceType": "ImagingStudy",
                    "id": "s2",
                    "subject": {"reference": "Patient/p2"},
                }
            },
            {"resource": {"resourceType": "Patient", "id": "p2"}, "search": {"mode": "include"}},
            {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}},
        ],
    }

    def kept(scopes: list[str], patient: str | None) -> list[str]:
        claims = AccessClaims("u", "c", scopes, patient, None, 0)
        out = filter_bundle(bundle, Access(claims))
        return [e["resource"].get("id", "outcome") for e in out["entry"]]

    assert kept(["user/ImagingStudy.rs"], None) == ["s1", "s2", "outcome"]
    assert kept(["user/ImagingStudy.rs", "user/Patient.rs"], None) == ["s1", "s2", "p2", "outcome"]
    assert kept(["patient/ImagingStudy.rs", "patient/Patient.rs"], "p2") == ["s2", "p2", "outcome"]
    # A patient token is judged by patient/ scopes only, a user token by user/ ones only.
    assert kept(["user/ImagingStudy.rs", "user/Patient.rs"], "p2") == ["outcome"]
    assert kept(["patient/ImagingStudy.rs"], None) == ["outcome"]


# --- TEST-ONLY: the unfiltered proxy (CXR_DEV_EHR_PROXY_FILTER=false) --------------------------


@pytest.fixture
def unfiltered(
    ehr_settings: Settings, fake_hapi: FakeHapi, clock: FakeClock
) -> Iterator[SmartClient]:
    settings = ehr_settings.model_copy(update={"dev_ehr_proxy_filter": False})
    ehr = build_ehr(settings, upstream_transport=httpx.MockTransport(fake_hapi), clock=clock)
    with TestClient(create_app(settings, ehr=ehr), base_url=DEV_EHR) as client:
        client.follow_redirects = False
        yield SmartClient(client, iss=f"{DEV_EHR}/fhir", redirect_uri=f"{APP}/app/callback")


def test_the_unfiltered_proxy_answers_a_patient_token_with_every_patient(
    unfiltered: SmartClient, fake_hapi: FakeHapi
) -> None:
    token = unfiltered.ehr_launch_token("p1")["access_token"]
    search = unfiltered.fhir("ImagingStudy", token)
    assert search.status_code == 200
    assert {e["resource"]["id"] for e in search.json()["entry"]} == {"study-p1", "study-p2"}
    assert "patient" not in fake_hapi.requests[-1].url.params
    assert unfiltered.fhir("ImagingStudy/study-p2", token).status_code == 200
    assert unfiltered.fhir("Patient/p2", token).status_code == 200
    # Still a SMART server: tokens checked, patient/ scopes judged, writes refused.
    assert unfiltered.fhir("ImagingStudy", None).status_code == 401
    assert unfiltered.fhir("Device/model", token).status_code == 403
    written = unfiltered.http.post(
        f"{unfiltered.iss}/ImagingStudy",
        json={"resourceType": "ImagingStudy"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert written.status_code == 403
