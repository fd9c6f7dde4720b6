"""Writes through the dev EHR's proxy (issue 18): one transaction at the base, each entry
judged against the token's c/u scopes and, for a patient token, its patient; a launch without
the write scopes cannot write."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.dev_ehr.conftest import FakeHapi
from tests.dev_ehr.smart_client import EHR_SCOPES, USER_RESOURCE_SCOPES, SmartClient

WRITES = "Observation.cu DiagnosticReport.u Provenance.c ImagingStudy.c Media.c"
PATIENT_WRITES = " ".join(f"patient/{w}" for w in WRITES.split())
USER_WRITES = " ".join(f"user/{w}" for w in WRITES.split())


def _obs(rid: str | None, pid: str) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/{pid}"},
    }
    if rid:
        obs["id"] = rid
    return obs


def review_bundle(pid: str = "p1", existing: str = "obs-p1") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:00000000-0000-0000-0000-000000000001",
                "resource": _obs(existing, pid),
                "request": {"method": "PUT", "url": f"Observation/{existing}"},
            },
            {
                "fullUrl": "urn:uuid:00000000-0000-0000-0000-000000000002",
                "resource": _obs(None, pid),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": "urn:uuid:00000000-0000-0000-0000-000000000003",
                "resource": {
                    "resourceType": "Provenance",
                    "target": [
                        {"reference": f"Observation/{existing}"},
                        {"reference": "urn:uuid:00000000-0000-0000-0000-000000000002"},
                    ],
                },
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }


def _posts_at_base(hapi: FakeHapi) -> list[dict[str, Any]]:
    return [
        json.loads(r.content)
        for r in hapi.requests
        if r.method == "POST" and r.url.path.rstrip("/").endswith("/fhir")
    ]


@pytest.fixture
def writer(smart: SmartClient) -> str:
    token = smart.ehr_launch_token("p1", scope=f"{EHR_SCOPES} {PATIENT_WRITES}")
    assert "patient/Observation.cu" in token["scope"].split()
    access: str = token["access_token"]
    return access


def post(smart: SmartClient, token: str, bundle: Any) -> Any:
    return smart.fhir("", token, method="POST", json=bundle)


def test_a_review_transaction_in_the_patient_compartment_goes_through(
    smart: SmartClient, writer: str, fake_hapi: FakeHapi
) -> None:
    resp = post(smart, writer, review_bundle())
    assert resp.status_code == 201, resp.text
    assert _posts_at_base(fake_hapi) == [review_bundle()]
    # The signed-in user's Practitioner was made first (reviews reference it).
    puts = [r for r in fake_hapi.requests if r.method == "PUT"]
    assert [r.url.path for r in puts] == ["/fhir/Practitioner/cxr-dev-radiologist"]
    post(smart, writer, review_bundle())
    assert len([r for r in fake_hapi.requests if r.method == "PUT"]) == 1, "once per process"


def test_without_write_scopes_nothing_is_written(smart: SmartClient, fake_hapi: FakeHapi) -> None:
    read_only = smart.ehr_launch_token("p1")["access_token"]
    resp = post(smart, read_only, review_bundle())
    assert resp.status_code == 403
    assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    assert "do not allow update of Observation" in resp.text
    assert _posts_at_base(fake_hapi) == []


@pytest.mark.parametrize(
    ("bundle", "message"),
    [
        (review_bundle(existing="obs-p2"), "outside the token's patient compartment"),
        (review_bundle(pid="p2"), "not Patient/p1's"),
        (
            {
                **review_bundle(),
                "entry": [
                    {
                        "resource": {
                            "resourceType": "Provenance",
                            "target": [{"reference": "Observation/obs-p2"}],
                        },
                        "request": {"method": "POST", "url": "Provenance"},
                    }
                ],
            },
            "only target entries of its transaction",
        ),
        (
            {
                **review_bundle(),
                "entry": [{"request": {"method": "DELETE", "url": "Observation/obs-p1"}}],
            },
            "only POST and PUT",
        ),
        (
            {
                **review_bundle(),
                "entry": [
                    {
                        "resource": {"resourceType": "Patient"},
                        "request": {"method": "POST", "url": "Patient"},
                    }
                ],
            },
            "do not allow create of Patient",
        ),
        ({**review_bundle(), "type": "batch"}, "transaction"),
        ({"resourceType": "Observation"}, "transaction Bundle only"),
    ],
)
def test_writes_outside_the_grant_are_refused(
    smart: SmartClient, writer: str, fake_hapi: FakeHapi, bundle: Any, message: str
) -> None:
    resp = post(smart, writer, bundle)
    assert resp.status_code == 403, resp.text
    assert message in resp.text
    assert _posts_at_base(fake_hapi) == []


def test_a_user_token_writes_across_patients(smart: SmartClient, fake_hapi: FakeHapi) -> None:
    token = smart.user_launch_token(f"{EHR_SCOPES} {USER_RESOURCE_SCOPES} {USER_WRITES}")
    assert "patient" not in token
    resp = post(smart, token["access_token"], review_bundle(pid="p2", existing="obs-p2"))
    assert resp.status_code == 201, resp.text
    user_read_only = smart.user_launch_token()["access_token"]
    assert post(smart, user_read_only, review_bundle()).status_code == 403


def test_a_malformed_body_is_400(smart: SmartClient, writer: str) -> None:
    resp = smart.http.post(
        smart.iss,
        content=b"{not json",
        headers={"Authorization": f"Bearer {writer}", "Content-Type": "application/fhir+json"},
    )
    assert resp.status_code == 400
    assert resp.json()["resourceType"] == "OperationOutcome"
