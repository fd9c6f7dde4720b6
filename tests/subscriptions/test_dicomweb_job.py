"""The DICOMweb pixel path of the job against an in-memory FHIR server: a PACS that is down is
retried (transient) and ends in a failed Task naming it; an Endpoint that is not the
configured PACS is refused (SSRF); a study registered before its image reached the PACS waits
with the Study Instance UID on its Task, and the sweep looks again."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cxr_errors import MissingImageError, PacsUnavailableError
from fhir_service.dicom.web import DicomwebPacs
from fhir_service.fhir.tasks import awaited_in_pacs, task_business_status
from subscriptions.failures import Kind, RetryPolicy, classify
from subscriptions.pipeline import Pipeline
from subscriptions.reconcile import queue_pacs_rechecks
from tests.dicom.helpers import nih_png, part10, wrapped
from tests.fake_fhir import FakeFhir
from tests.subscriptions.test_job_states import _Analyzer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _study_with_endpoint(server: FakeFhir, address: str, uid: str = "1.2.3.4") -> None:
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
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
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


class _LatePacs:
    """A PACS at the Endpoint's address that holds the study only once ``arrive`` is called
    (the modality's STOW comes after the EHR registered the study)."""

    base_url = "http://pacs.test/dicom-web"

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.held = False
        self.stored: list[Any] = []

    def study_instances(self, study_uid: str) -> list[Any]:
        if not self.held:
            raise MissingImageError(f"the PACS at {self.base_url} holds no study {study_uid}")
        return [self.ds]

    def instance(self, study_uid: str, series_uid: str, sop_uid: str, *, max_bytes: int) -> bytes:
        return part10(self.ds)

    def store(self, datasets: Any) -> None:
        self.stored.extend(datasets)


def test_a_study_registered_before_its_stow_waits_on_the_pacs_and_the_sweep_looks_again(
    shared_dir: Path,
) -> None:
    server = FakeFhir()
    ds = wrapped(nih_png(shared_dir, 0), tag="late")
    pacs = _LatePacs(ds)
    _study_with_endpoint(server, pacs.base_url, str(ds.StudyInstanceUID))
    pipeline = Pipeline(
        fhir=server.client(), analyzer=_Analyzer(), pacs=pacs, image_wait=timedelta(hours=1)
    )

    assert pipeline.process("s1", "1").startswith("waiting for images")
    waiting = _task(server)
    assert waiting["status"] == "on-hold"
    assert awaited_in_pacs(waiting)
    assert waiting["input"][0]["valueIdentifier"]["value"] == f"urn:oid:{ds.StudyInstanceUID}"
    queued: list[str] = []
    assert queue_pacs_rechecks({"s1": waiting}, lambda sid, why: queued.append(sid) or True) == 1
    assert queued == ["s1"]
    # Looked at again before the image is there: nothing changes in FHIR.
    assert pipeline.process("s1", "1").startswith("waiting for images")
    assert _task(server)["meta"]["versionId"] == waiting["meta"]["versionId"]

    pacs.held = True  # the STOW reaches the PACS; nothing tells FHIR
    assert pipeline.process("s1", "1") == "reported"
    done = _task(server)
    assert done["status"] == "completed"
    assert "input" not in done and not awaited_in_pacs(done)
    assert len(server.all("DiagnosticReport")) == 1


def test_a_media_study_waits_without_a_pacs_recheck() -> None:
    server = FakeFhir()
    server.put({"resourceType": "Patient", "id": "p1"})
    server.put(
        {
            "resourceType": "ImagingStudy",
            "id": "s1",
            "status": "available",
            "subject": {"reference": "Patient/p1"},
        }
    )
    pipeline = Pipeline(fhir=server.client(), analyzer=_Analyzer(), image_wait=timedelta(hours=1))
    assert pipeline.process("s1", "1").startswith("waiting for images")
    task = _task(server)
    assert not awaited_in_pacs(task)
    assert queue_pacs_rechecks({"s1": task}, lambda sid, why: True) == 0
