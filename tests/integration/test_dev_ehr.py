"""``cxr dev-ehr`` in front of the real HAPI server: EHR (patient and user-level) and
standalone launch end to end, the picker listing HAPI's patients, compartment and scope
enforcement on real data, paging behind the proxy, and the CLI process itself over real
HTTP."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from fhir_service.dev_ehr import create_app
from fhir_service.fhir.client import FhirClient
from fhir_service.ingest.nih import read_manifest
from fhir_service.ingest.transaction import created_id, study_bundle
from fhir_service.ops.stack import dev_ehr_process, start_dev_ehr, stop_dev_ehr
from fhir_service.settings import Settings
from tests.dev_ehr.smart_client import BOTH_SCOPES, USER_RESOURCE_SCOPES, SmartClient
from tests.factories import unique_suffix
from tests.integration.conftest import HapiServer

pytestmark = pytest.mark.integration

DEV_EHR = "http://dev-ehr.test"
APP = "http://app.test"


@dataclass
class Patients:
    a: str
    a_studies: list[str]
    b: str
    b_study: str
    tag: str


@pytest.fixture(scope="module")
def patients(hapi: HapiServer, test_settings: Settings) -> Patients:
    records = list(read_manifest(test_settings.shared_dir / "data" / "nih-sample" / "manifest.csv"))
    tag = unique_suffix()
    png = b"\x89PNG\r\n\x1a\n not decoded by these tests"
    with FhirClient(hapi.base_url, timeout=60) as fhir:
        a1 = fhir.transaction(study_bundle(records[0], png, tag=tag))
        second = dataclasses.replace(records[0], image_index=records[0].image_index + "-b")
        a2 = fhir.transaction(study_bundle(second, png, tag=tag))
        b = fhir.transaction(study_bundle(records[1], png, tag=tag))
    assert created_id(a1, "Patient") == created_id(a2, "Patient")
    return Patients(
        a=created_id(a1, "Patient"),
        a_studies=[created_id(a1, "ImagingStudy"), created_id(a2, "ImagingStudy")],
        b=created_id(b, "Patient"),
        b_study=created_id(b, "ImagingStudy"),
        tag=tag,
    )


@pytest.fixture
def smart(hapi: HapiServer, test_settings: Settings, tmp_path: Path) -> Iterator[SmartClient]:
    settings = test_settings.model_copy(
        update={"data_dir": tmp_path, "dev_ehr_public_url": DEV_EHR, "service_public_url": APP}
    )
    with TestClient(create_app(settings), base_url=DEV_EHR) as client:
        client.follow_redirects = False
        yield SmartClient(client, iss=f"{DEV_EHR}/fhir", redirect_uri=f"{APP}/app/callback")


def _ids(bundle: dict[str, object]) -> list[str]:
    entries = bundle.get("entry", [])
    assert isinstance(entries, list)
    return sorted(e["resource"]["id"] for e in entries)


def test_ehr_launch_reads_the_patients_hapi_data(smart: SmartClient, patients: Patients) -> None:
    page = smart.http.get("/launch", params={"patient": patients.a})
    assert f"/launch/ehr?patient={patients.a}" in page.text
    token = smart.ehr_launch_token(patients.a)
    access = token["access_token"]
    assert token["patient"] == patients.a
    assert smart.fhir(f"Patient/{patients.a}", access).json()["id"] == patients.a
    assert _ids(smart.fhir("ImagingStudy", access).json()) == sorted(patients.a_studies)
    media = smart.fhir("Media", access).json()
    assert len(media["entry"]) == 2
    assert smart.fhir(f"ImagingStudy/{patients.a_studies[0]}", access).status_code == 200
    # Another patient's data, however asked for, is refused.
    assert smart.fhir(f"Patient/{patients.b}", access).status_code == 403
    assert smart.fhir(f"ImagingStudy/{patients.b_study}", access).status_code == 403
    assert smart.fhir(f"ImagingStudy?patient={patients.b}", access).status_code == 403
    assert smart.fhir("ImagingStudy", None).status_code == 401


def test_standalone_picker_lists_hapi_patients(smart: SmartClient, patients: Patients) -> None:
    attempt = smart.authorize(
        scope="launch/patient openid fhirUser patient/ImagingStudy.rs patient/Patient.rs"
    )
    assert patients.b in attempt.response.text
    back = smart.redirected(smart.pick(attempt.response, patients.b))
    assert back["state"] == attempt.state
    token = smart.exchange(back["code"], attempt.verifier).json()
    assert token["patient"] == patients.b
    assert _ids(smart.fhir("ImagingStudy", token["access_token"]).json()) == [patients.b_study]
    other = smart.fhir(f"ImagingStudy/{patients.a_studies[0]}", token["access_token"])
    assert other.status_code == 403


def test_user_level_launch_reads_across_patients(smart: SmartClient, patients: Patients) -> None:
    token = smart.user_launch_token()
    assert "patient" not in token
    granted = token["scope"].split()
    assert [s for s in granted if "/" in s] == USER_RESOURCE_SCOPES.split()
    access = token["access_token"]
    # Two patients' studies and records, read and searched with the one token.
    for sid in (patients.a_studies[0], patients.b_study):
        assert smart.fhir(f"ImagingStudy/{sid}", access).status_code == 200, sid
    for pid in (patients.a, patients.b):
        assert smart.fhir(f"Patient/{pid}", access).status_code == 200, pid
    both = smart.fhir(f"ImagingStudy?_id={patients.a_studies[0]},{patients.b_study}", access)
    assert _ids(both.json()) == sorted([patients.a_studies[0], patients.b_study])
    with_patients = smart.fhir(
        f"ImagingStudy?_id={patients.b_study}&_include=ImagingStudy:subject", access
    ).json()
    assert _ids(with_patients) == sorted([patients.b, patients.b_study])
    # The app's by-study report search (a typed chain) is accepted by the proxy and HAPI.
    chained = smart.fhir(
        f"DiagnosticReport?result:Observation.derived-from=ImagingStudy/{patients.b_study}"
        "&_include=DiagnosticReport:result",
        access,
    )
    assert chained.status_code == 200, chained.text
    assert smart.fhir("ImagingStudy?patient.gender=male", access).status_code == 403
    # Still read-only.
    write = smart.fhir(
        "Patient", access, method="POST", json={"resourceType": "Patient", "gender": "other"}
    )
    assert write.status_code == 403

    # A patient token still stops at its patient.
    patient_token = smart.ehr_launch_token(patients.a, scope=BOTH_SCOPES)
    assert patient_token["patient"] == patients.a
    assert (
        smart.fhir(f"ImagingStudy/{patients.b_study}", patient_token["access_token"]).status_code
        == 403
    )
    assert smart.fhir(f"Patient/{patients.b}", patient_token["access_token"]).status_code == 403


def test_user_level_token_is_403_for_types_not_granted(
    smart: SmartClient, patients: Patients
) -> None:
    token = smart.user_launch_token(scope="launch openid user/ImagingStudy.rs")
    assert token["scope"].split() == ["launch", "openid", "user/ImagingStudy.rs"]
    access = token["access_token"]
    assert smart.fhir(f"ImagingStudy/{patients.b_study}", access).status_code == 200
    for path in (f"Patient/{patients.b}", "Media", f"Observation?subject=Patient/{patients.a}"):
        assert smart.fhir(path, access).status_code == 403, path
    # An _include of a type not granted is dropped from the bundle, not leaked.
    included = smart.fhir(
        f"ImagingStudy?_id={patients.b_study}&_include=ImagingStudy:subject", access
    ).json()
    assert _ids(included) == [patients.b_study]


def test_paging_links_stay_behind_the_proxy(smart: SmartClient, patients: Patients) -> None:
    access = smart.ehr_launch_token(patients.a)["access_token"]
    first = smart.fhir("ImagingStudy?_count=1", access).json()
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert links["next"].startswith(f"{DEV_EHR}/fhir"), links
    nxt = smart.http.get(links["next"], headers={"Authorization": f"Bearer {access}"})
    assert nxt.status_code == 200, nxt.text
    assert sorted(_ids(first) + _ids(nxt.json())) == sorted(patients.a_studies)
    assert smart.http.get(links["next"]).status_code == 401


def test_cli_process_serves_a_launch_over_http(
    hapi: HapiServer, test_settings: Settings, patients: Patients, tmp_path: Path
) -> None:
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    settings = test_settings.model_copy(
        update={"dev_ehr_port": 18002 + offset, "service_public_url": APP}
    )
    stop_dev_ehr(settings)
    start_dev_ehr(settings)
    try:
        with httpx.Client(base_url=settings.dev_ehr_url, timeout=30) as http:
            smart = SmartClient(
                http, iss=settings.dev_ehr_fhir_url, redirect_uri=f"{APP}/app/callback"
            )
            token = smart.ehr_launch_token(patients.a)
            assert smart.fhir(f"Patient/{patients.a}", token["access_token"]).status_code == 200
        log = dev_ehr_process(settings).log_file.read_text()
        assert "DEVELOPMENT TOOL — not for production" in log
    finally:
        stop_dev_ehr(settings)
