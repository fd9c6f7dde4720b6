"""The dev EHR's FHIR proxy: only valid tokens (401 otherwise), only the token's patient
compartment (403 outside), reads and searches only."""

from __future__ import annotations

import json
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from joserfc.jws import extract_compact

from tests.dev_ehr.conftest import DEV_EHR, FakeClock, FakeHapi
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
