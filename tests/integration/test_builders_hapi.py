"""The result transaction (fhir_service.fhir: results, tasks, supersede) against the real HAPI.

HAPI must accept the bundle as it is, a second post must create nothing, the analyst queries of
FHIR_PROFILE.md must find the results, and the failure Task and supersession must round-trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cxr_errors import FhirError
from fhir_service.fhir import studies
from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.identifiers import report_identifier, task_conditional_url
from fhir_service.fhir.results import build_result_transaction
from fhir_service.fhir.tasks import build_completed_task, build_failed_task
from fhir_service.fhir.terminology import TERMINOLOGY
from fhir_service.ingest import nih, transaction
from models.types import NIH_FINDINGS
from tests import factories
from tests.factories import RECORDED, make_analysis, make_heatmaps
from tests.integration.conftest import HapiServer

pytestmark = pytest.mark.integration

AIAST = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue|AIAST"
PNEUMOTHORAX = "http://snomed.info/sct|36118008"
Resource = dict[str, Any]


@dataclass
class Posted:
    """One study with one posted result transaction."""

    patient_id: str
    study: Resource
    bundle: Resource
    response: Resource
    image_sha256: str

    @property
    def study_id(self) -> str:
        return str(self.study["id"])

    def location(self, kind: str) -> list[str]:
        """``Type/id`` of each created (or matched) ``kind``, in bundle order."""
        out = []
        for req, res in zip(self.bundle["entry"], self.response["entry"], strict=True):
            if req["resource"]["resourceType"] == kind and req["request"]["method"] == "POST":
                loc = res["response"]["location"]
                out.append("/".join(loc.split("/_history/")[0].split("/")[-2:]))
        return out


def _synthetic_row() -> factories.ManifestRow:
    return factories.ManifestRow(
        file="synthetic-00000001_000.png",
        finding_labels=("Pneumothorax",),
        patient_id="00000001",
        follow_up=0,
        patient_age=61,
        patient_sex="F",
        view_position="PA",
        path=Path("/nonexistent/synthetic.png"),
    )


def _new_study(client: FhirClient) -> tuple[str, Resource]:
    """A study of this module's own: ``registered``, so that a worker of the same HAPI (the
    stack's, when this module runs after it) neither writes its Task nor waits for its image
    while these tests write the results and the Task themselves."""
    row = _synthetic_row()
    patient = client.create(factories.patient(row))
    assert patient["gender"] == "female"
    created = client.create(
        factories.imaging_study(row, f"Patient/{patient['id']}", status="registered")
    )
    return str(patient["id"]), client.read("ImagingStudy", created["id"])


def _post(client: FhirClient, *, untrained: bool = False) -> Posted:
    patient_id, study = _new_study(client)
    analysis = make_analysis(untrained=untrained)
    sha = hashlib.sha256(f"pixels of {study['id']}".encode()).hexdigest()
    bundle = build_result_transaction(
        study, analysis, make_heatmaps(analysis), image_sha256=sha, recorded=RECORDED
    )
    response = client.transaction(bundle)
    return Posted(patient_id, study, bundle, response, sha)


def _counts(client: FhirClient, posted: Posted, report: str) -> dict[str, int]:
    patient = f"Patient/{posted.patient_id}"
    device = TERMINOLOGY.identifier_system("device")
    return {
        "Device": client.count("Device", {"identifier": f"{device}|"}),
        "DiagnosticReport": client.count("DiagnosticReport", {"patient": patient}),
        "Observation": client.count("Observation", {"patient": patient}),
        "Media": client.count("Media", {"patient": patient}),
        "Provenance": client.count("Provenance", {"target": report}),
    }


def _ids(bundle: Resource, kind: str, mode: str = "match") -> set[str]:
    return {
        f"{kind}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e["resource"]["resourceType"] == kind and e.get("search", {}).get("mode") == mode
    }


def _all_ids(client: FhirClient, kind: str, params: dict[str, Any]) -> set[str]:
    """``Type/id`` of every match, over all pages: the shared server holds other tests' data."""
    return {f"{r['resourceType']}/{r['id']}" for r in client.search_all(kind, params)}


@pytest.fixture(scope="module")
def client(hapi: HapiServer) -> Iterator[FhirClient]:
    with FhirClient(hapi.base_url, timeout=120.0) as c:
        yield c


@pytest.fixture(scope="module")
def posted(client: FhirClient) -> Posted:
    return _post(client)


def test_hapi_accepts_the_transaction(posted: Posted) -> None:
    statuses = [e["response"]["status"] for e in posted.response["entry"]]
    assert all(s.startswith("201") for s in statuses[1:]), statuses
    assert len(posted.location("Observation")) == 14
    assert len(posted.location("Media")) == 2


def test_stored_report_links_resolve(client: FhirClient, posted: Posted) -> None:
    (report_ref,) = posted.location("DiagnosticReport")
    report = client.read_reference(report_ref)
    assert [r["reference"] for r in report["result"]] == posted.location("Observation")
    assert [m["link"]["reference"] for m in report["media"]] == posted.location("Media")
    assert report["meta"]["security"][0]["code"] == "AIAST"
    (device_ref,) = posted.location("Device")
    obs = client.read_reference(posted.location("Observation")[0])
    assert obs["device"]["reference"] == device_ref
    (prov_ref,) = posted.location("Provenance")
    prov = client.read_reference(prov_ref)
    assert prov["agent"][0]["who"]["reference"] == device_ref
    assert prov["target"][0]["reference"] == report_ref
    # The source is the study version that was read. HAPI strips versions from references
    # unless told not to: ParserOptions.setDontStripVersionsFromReferencesAtPaths(
    # "Provenance.entity.what") in the server's FhirContext.
    version = posted.study["meta"]["versionId"]
    assert prov["entity"][0]["what"]["reference"] == (
        f"ImagingStudy/{posted.study_id}/_history/{version}"
    ), "HAPI stripped the version from Provenance.entity.what"


def test_posting_again_creates_nothing(client: FhirClient, posted: Posted) -> None:
    (report_ref,) = posted.location("DiagnosticReport")
    before = _counts(client, posted, report_ref)
    assert before["DiagnosticReport"] == 1 and before["Observation"] == 14
    assert before["Media"] == 2 and before["Provenance"] == 1
    again = client.transaction(posted.bundle)
    statuses = [e["response"]["status"] for e in again["entry"]]
    assert all(s.startswith("200") for s in statuses), statuses
    repeat = Posted(posted.patient_id, posted.study, posted.bundle, again, posted.image_sha256)
    for kind in ("Device", "DiagnosticReport", "Observation", "Media", "Provenance"):
        assert repeat.location(kind) == posted.location(kind), kind
    assert _counts(client, posted, report_ref) == before


def test_report_is_found_by_its_idempotency_key(client: FhirClient, posted: Posted) -> None:
    analysis = make_analysis()
    system, value = report_identifier(posted.study_id, analysis.model_version, posted.image_sha256)
    found = client.search("DiagnosticReport", {"identifier": f"{system}|{value}"})
    assert _ids(found, "DiagnosticReport") == set(posted.location("DiagnosticReport"))


def test_query_pneumothorax_above_0_8(client: FhirClient, posted: Posted) -> None:
    found = _all_ids(client, "Observation", {"code": PNEUMOTHORAX, "value-quantity": "gt0.8"})
    pneumothorax = posted.location("Observation")[NIH_FINDINGS.index("Pneumothorax")]
    assert pneumothorax in found
    below = _all_ids(client, "Observation", {"code": PNEUMOTHORAX, "value-quantity": "gt0.95"})
    assert pneumothorax not in below


def test_query_derived_from_study(client: FhirClient, posted: Posted) -> None:
    found = client.search(
        "Observation", {"derived-from": f"ImagingStudy/{posted.study_id}", "_count": 50}
    )
    assert _ids(found, "Observation") == set(posted.location("Observation"))


def test_query_report_with_includes(client: FhirClient, posted: Posted) -> None:
    found = client.search(
        "DiagnosticReport",
        {
            "patient": posted.patient_id,
            "_include": ["DiagnosticReport:result", "DiagnosticReport:media"],
        },
    )
    assert _ids(found, "DiagnosticReport") == set(posted.location("DiagnosticReport"))
    assert _ids(found, "Observation", "include") == set(posted.location("Observation"))
    assert _ids(found, "Media", "include") == set(posted.location("Media"))


def test_query_ai_asserted_positives(client: FhirClient, posted: Posted) -> None:
    # R4 defines no "interpretation" search parameter on Observation: the server must
    # carry a SearchParameter for Observation.interpretation (token) for this query.
    found = _all_ids(client, "Observation", {"_security": AIAST, "interpretation": "POS"})
    positives = {
        posted.location("Observation")[NIH_FINDINGS.index(name)]
        for name in ("Effusion", "Pneumothorax")
    }
    assert found & set(posted.location("Observation")) == positives


def test_query_chained_patient_gender(client: FhirClient, posted: Posted) -> None:
    pneumothorax = posted.location("Observation")[NIH_FINDINGS.index("Pneumothorax")]
    female = _all_ids(
        client, "Observation", {"code": PNEUMOTHORAX, "subject:Patient.gender": "female"}
    )
    assert pneumothorax in female
    male = _all_ids(client, "Observation", {"code": PNEUMOTHORAX, "subject:Patient.gender": "male"})
    assert pneumothorax not in male


def test_untrained_result_is_accepted(client: FhirClient) -> None:
    posted = _post(client, untrained=True)
    (report_ref,) = posted.location("DiagnosticReport")
    report = client.read_reference(report_ref)
    assert report["conclusion"].startswith("UNTRAINED MODEL — NOT A FINDING")
    (device_ref,) = posted.location("Device")
    assert "untrained" in client.read_reference(device_ref)["version"][0]["value"]


def test_changed_image_supersedes_the_old_report(client: FhirClient) -> None:
    first = _post(client)
    (old_ref,) = first.location("DiagnosticReport")
    old_report = client.read_reference(old_ref)
    old_results = [client.read_reference(r) for r in first.location("Observation")]
    old_media = [client.read_reference(r) for r in first.location("Media")]

    analysis = make_analysis({"Pneumothorax": 0.4})
    bundle = build_result_transaction(
        first.study,
        analysis,
        make_heatmaps(analysis),
        image_sha256=hashlib.sha256(b"new pixels").hexdigest(),
        recorded=RECORDED + timedelta(hours=1),
        supersedes=[old_report, *old_results, *old_media],
    )
    response = client.transaction(bundle)
    second = Posted(first.patient_id, first.study, bundle, response, "")

    assert client.read_reference(old_ref)["status"] == "cancelled"
    assert {client.read_reference(r)["status"] for r in first.location("Observation")} == {
        "cancelled"
    }
    assert {client.read_reference(r)["status"] for r in first.location("Media")} == {"stopped"}
    (new_ref,) = second.location("DiagnosticReport")
    assert new_ref != old_ref
    (prov_ref,) = second.location("Provenance")
    entities = client.read_reference(prov_ref)["entity"]
    revision = {"role": "revision", "what": {"reference": f"{old_ref}/_history/1"}}
    assert revision in entities, "HAPI stripped the version from Provenance.entity.what"
    live = client.search("DiagnosticReport", {"patient": first.patient_id, "status": "preliminary"})
    assert _ids(live, "DiagnosticReport") == {new_ref}


def test_failed_task_is_updated_not_duplicated_then_completed(client: FhirClient) -> None:
    _, study = _new_study(client)
    url = task_conditional_url(study["id"])
    first = build_failed_task(
        study, "no Media with pixels for this study", "no-pixels", now=RECORDED
    )
    created = client.request("PUT", url, json=first).json()
    retry = build_failed_task(
        study,
        "pixel data is not a decodable image: truncated PNG",
        "undecodable-image",
        now=RECORDED + timedelta(minutes=2),
        existing_task=created,
    )
    updated = client.request("PUT", url, json=retry).json()
    assert updated["id"] == created["id"]
    tasks = client.search("Task", {"focus": f"ImagingStudy/{study['id']}"})
    assert len(_ids(tasks, "Task")) == 1
    assert updated["statusReason"]["text"].endswith("truncated PNG")

    done = build_completed_task(updated, now=RECORDED + timedelta(minutes=5))
    stored = client.request("PUT", url, json=done).json()
    assert stored["id"] == created["id"] and stored["status"] == "completed"
    assert client.count("Task", {"focus": f"ImagingStudy/{study['id']}"}) == 1


def test_the_report_transaction_completes_the_open_task_or_is_refused_whole(
    client: FhirClient,
) -> None:
    """The Task closes in the report's own commit, its output names the report HAPI created;
    a Task changed since it was read refuses the whole transaction (no report without it)."""
    _, study = _new_study(client)
    url = task_conditional_url(study["id"])
    failed = build_failed_task(study, "no Media with pixels for this study", "no-pixels")
    task = client.request("PUT", url, json=failed).json()
    analysis = make_analysis()
    sha = hashlib.sha256(f"pixels of {study['id']}".encode()).hexdigest()

    def report_transaction(open_task: Resource) -> Resource:
        return build_result_transaction(
            study,
            analysis,
            make_heatmaps(analysis),
            image_sha256=sha,
            recorded=RECORDED,
            open_task=open_task,
        )

    stale = dict(task)
    changed = {**failed, "id": task["id"], "statusReason": {"text": "changed meanwhile"}}
    client.request("PUT", url, json=changed)
    with pytest.raises(FhirError) as refused:
        client.transaction(report_transaction(stale))
    assert refused.value.http_status in (409, 412)
    system, value = report_identifier(study["id"], analysis.model_version, sha)
    assert client.count("DiagnosticReport", {"identifier": f"{system}|{value}"}) == 0

    fresh = client.read("Task", task["id"])
    response = client.transaction(report_transaction(fresh))
    report = next(
        e["response"]["location"].split("/_history/")[0]
        for e in response["entry"]
        if e["response"]["location"].startswith("DiagnosticReport/")
    )
    done = client.read("Task", task["id"])
    assert done["status"] == "completed"
    assert done["output"][0]["valueReference"]["reference"] == report
    assert client.count("Task", {"focus": f"ImagingStudy/{study['id']}"}) == 1


def test_nih_infant_study_is_accepted(client: FhirClient) -> None:
    # NIH has 14 rows with Patient Age 0; R4's age-1 invariant refuses a zero Age value.
    rec = nih.NihRecord("99999999_000.png", "99999999", 0, 0, "female", "AP", ())
    response = client.transaction(transaction.study_bundle(rec, None, tag="infant"))
    location = next(
        e["response"]["location"]
        for e in response["entry"]
        if e["response"]["location"].startswith("ImagingStudy/")
    )
    stored = client.read("ImagingStudy", location.split("/")[1])
    assert studies.study_age_and_view(stored) == (0, "AP")
