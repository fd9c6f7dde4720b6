"""The DICOMweb pixel path of the job against an in-memory FHIR server: a PACS that is down is
retried (transient) and ends in a failed Task naming it; an Endpoint that is not the
configured PACS is refused (SSRF)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from cxr_errors import PacsUnavailableError
from fhir_service.dicom.web import DicomwebPacs
from fhir_service.fhir.tasks import task_business_status
from subscriptions.failures import Kind, RetryPolicy, classify
from subscriptions.pipeline import Pipeline
from tests.fake_fhir import FakeFhir
from tests.subscriptions.test_job_states import _Analyzer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _study_with_endpoint(server: FakeFhir, address: str) -> None:
    server.put({"resourceType": "Patient", "id": "p1"})
    server.put(
        {
            "resourceType": "Endpoint",
            "id": "e1",
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "dicom-wado-rs",
            },
            "payloadType": [{"text": "DICOM"}],
            "address": address,
        }
    )
    server.put(
        {
            "resourceType": "ImagingStudy",
            "id": "s1",
            "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}],
            "subject": {"reference": "Patient/p1"},
            "endpoint": [{"reference": "Endpoint/e1"}],
        }
    )


def _task(server: FakeFhir) -> dict[str, Any]:
    tasks = server.all("Task")
    assert len(tasks) == 1
    return tasks[0]


def test_pacs_down_is_transient_then_a_failed_task_names_the_pacs() -> None:
    server = FakeFhir()
    pacs = DicomwebPacs(f"http://127.0.0.1:{_closed_port()}/dicom-web", timeout_s=2)
    _study_with_endpoint(server, pacs.base_url)
    pipeline = Pipeline(
        fhir=server.client(),
        analyzer=_Analyzer(),
        pacs=pacs,
        retry=RetryPolicy(transient_retries=1),
    )
    with pytest.raises(PacsUnavailableError) as first:
        pipeline.process("s1", "1", attempt=0)
    assert classify(first.value).kind is Kind.TRANSIENT
    assert server.all("Task") == []  # retried, not failed yet
    with pytest.raises(PacsUnavailableError):
        pipeline.process("s1", "1", attempt=1)
    task = _task(server)
    assert task["status"] == "failed"
    assert task_business_status(task) == "retries-exhausted"
    assert "PACS" in task["statusReason"]["text"]
    assert "unreachable" in task["statusReason"]["text"]


def test_an_endpoint_that_is_not_the_configured_pacs_is_refused() -> None:
    server = FakeFhir()
    pacs = DicomwebPacs(f"http://127.0.0.1:{_closed_port()}/dicom-web", timeout_s=2)
    _study_with_endpoint(server, "http://169.254.169.254/dicom-web")
    pipeline = Pipeline(fhir=server.client(), analyzer=_Analyzer(), pacs=pacs)
    outcome = pipeline.process("s1", "1")
    assert outcome.startswith("failed:")
    assert "is not the configured PACS" in _task(server)["statusReason"]["text"]
