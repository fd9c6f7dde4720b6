"""HAPI's ``$validate`` on every resource type the DICOMweb path writes — the Patient,
ServiceRequest, Endpoint and ImagingStudy of `cxr ingest dicom`, and the Device,
DiagnosticReport, Observations, Media, Provenance and the SR-listing ImagingStudy of the
report — with 0 errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_service.dicom.web import DicomwebPacs
from fhir_service.ingest.dicom_files import ingest_dicom
from tests.dicom.helpers import nih_png, wrapped
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration


def _errors(stack: Stack, resource: dict[str, Any]) -> list[str]:
    """The error and fatal issues of HAPI's ``$validate`` (it answers 412 when there are)."""
    kind = resource["resourceType"]
    response = httpx.post(
        f"{stack.settings.fhir_base_url}/{kind}/$validate",
        json=resource,
        headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
        timeout=120,
    )
    issues = response.json().get("issue", [])
    where = f"{kind}/{resource.get('id')}"
    return [
        f"{where}: {i.get('diagnostics')} @ {i.get('expression') or i.get('location')}"
        for i in issues
        if i.get("severity") in ("error", "fatal")
    ]


def test_every_resource_of_the_dicomweb_path_validates(
    stack: Stack, pacs: DicomwebPacs, shared_dir: Path, tmp_path: Path
) -> None:
    source = wrapped(nih_png(shared_dir, 5))
    source.save_as(tmp_path / "s.dcm", enforce_file_format=True)
    result = ingest_dicom([tmp_path], stack.fhir, pacs, max_bytes=stack.settings.max_image_bytes)
    study_id = result.studies[0].imaging_study.split("/")[1]
    report = wait_for("a report", lambda: stack.reports(study_id))[0]
    study = stack.fhir.read("ImagingStudy", study_id)
    resources = [study, report]
    resources += [stack.fhir.read_reference(r["reference"]) for r in study["endpoint"]]
    resources += [stack.fhir.read_reference(r["reference"]) for r in study["basedOn"]]
    resources.append(stack.fhir.read_reference(study["subject"]["reference"]))
    resources += [stack.fhir.read_reference(r["reference"]) for r in report["imagingStudy"][1:]]
    observations = [stack.fhir.read_reference(r["reference"]) for r in report["result"]]
    resources += observations
    resources.append(stack.fhir.read_reference(observations[0]["device"]["reference"]))
    resources += [
        stack.fhir.read_reference(m["link"]["reference"]) for m in report.get("media", [])
    ]
    provenances = list(
        stack.fhir.search_all("Provenance", {"target": f"DiagnosticReport/{report['id']}"})
    )
    resources += provenances
    # The model card, which the Provenance names.
    resources += [
        stack.fhir.read_reference(e["what"]["reference"])
        for p in provenances
        for e in p["entity"]
        if str(e["what"].get("reference", "")).startswith("DocumentReference/")
    ]
    # Each Observation names the SOP Instance UID it was read from, and it is the source's.
    sop = {
        ext["valueIdentifier"]["value"]
        for o in observations
        for ext in o["extension"]
        if ext["url"].endswith("/source-instance")
    }
    assert sop == {f"urn:oid:{source.SOPInstanceUID}"}
    kinds = {r["resourceType"] for r in resources}
    assert {
        "ImagingStudy",
        "DiagnosticReport",
        "Endpoint",
        "ServiceRequest",
        "Patient",
        "Observation",
        "Device",
        "Provenance",
        "DocumentReference",
    } <= kinds
    errors = [e for r in resources for e in _errors(stack, r)]
    assert errors == []
