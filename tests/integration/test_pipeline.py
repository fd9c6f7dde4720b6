"""Subscription → queue → worker → FHIR results, with the real HAPI, PostgreSQL and worker.

One service process and one worker process (untrained model) serve the whole module; the
tests post studies through HAPI exactly as an integrator would. Faults (a killed worker, the
service down, duplicate notifications...) are in test_faults.py, late images in
test_late_images.py.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pydicom
import pytest

from subscriptions.bootstrap import SECRET_HEADER
from tests.factories import make_gray_png
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration


def test_study_gets_exactly_one_complete_report(stack: Stack) -> None:
    study_id = stack.post_study(0)
    reports = wait_for("a report", lambda: stack.reports(study_id))
    assert len(reports) == 1
    report = reports[0]
    assert report["status"] == "preliminary"
    assert len(report["result"]) == 14
    assert "UNTRAINED" in report["conclusion"].upper()
    observations = list(
        stack.fhir.search_all("Observation", {"derived-from": f"ImagingStudy/{study_id}"})
    )
    assert len(observations) == 14
    for obs in observations:
        assert obs["status"] == "preliminary"
        assert "untrained" in " ".join(n["text"] for n in obs.get("note", [])).lower()
        # The image read is named beside the study.
        assert [r["reference"].split("/")[0] for r in obs["derivedFrom"]] == [
            "ImagingStudy",
            "Media",
        ]
    device = stack.fhir.read_reference(observations[0]["device"]["reference"])
    assert "untrained" in str(device.get("version")).lower()
    provenance = list(
        stack.fhir.search_all("Provenance", {"target": f"DiagnosticReport/{report['id']}"})
    )
    assert len(provenance) == 1
    (card_ref,) = [
        e["what"]["reference"]
        for e in provenance[0]["entity"]
        if e["what"].get("display") == "model card"
    ]
    card = stack.fhir.read_reference(card_ref)
    assert "UNTRAINED" in card["description"]
    assert card["subject"]["reference"] == observations[0]["device"]["reference"]
    assert len(report.get("media", [])) == sum(
        1 for o in observations if o["interpretation"][0]["coding"][0]["code"] == "POS"
    )
    assert stack.task(study_id) is None


def test_notifications_differing_only_in_version_queue_one_job_at_a_time(stack: Stack) -> None:
    """Issue 13: 200 notifications of one study that differ only in meta.versionId ran 200
    jobs. Now at most one job per study waits (it reads the current version), so a burst of
    them queues few jobs and makes no second report."""
    study_id = stack.post_study(3)
    wait_for("a report", lambda: stack.reports(study_id))
    wait_for("the queue to drain", stack.drained)
    versions = range(1000, 1200)
    answers = stack.notify_burst(stack.fhir.read("ImagingStudy", study_id), versions)
    assert all(r.status_code == 200 for r in answers)
    queued = [r for r in answers if "already queued" not in r.text]
    assert len(stack.burst_jobs(study_id, versions)) == len(queued)
    assert len(queued) <= 100, f"{len(queued)} jobs for 200 notifications"
    wait_for("the queue to drain", stack.drained)
    assert len(stack.reports(study_id)) == len(stack.current_reports(study_id)) == 1


def test_wrong_or_missing_secret_is_refused_and_queues_nothing(stack: Stack) -> None:
    study_id = stack.post_study(2, image=None)
    study = stack.fhir.read("ImagingStudy", study_id)
    # Its own (genuine) notification must have been handled before the count is taken.
    wait_for("the study's waiting Task", lambda: stack.task(study_id))
    wait_for("the queue to drain", stack.drained)
    before = len(stack.jobs())
    hook = f"{stack.settings.service_url}/hook/ImagingStudy/{study_id}"
    with httpx.Client(timeout=10) as http:
        missing = http.put(hook, json=study)
        wrong = http.put(hook, json=study, headers={SECRET_HEADER: "not-the-secret"})
    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert wrong.json()["resourceType"] == "OperationOutcome"
    assert len(stack.jobs()) == before


def _lateral_dicom(stack: Stack) -> bytes:
    """The real SIIM chest film, tagged as a lateral view."""
    path = stack.settings.shared_dir / "data" / "dicom"
    ds = pydicom.dcmread(next(path.glob("siim_*.dcm")))
    ds.ViewPosition = "LL"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kind", "expected", "status"),
    [
        ("corrupt", "not a recognised image format", "failed"),
        # no image yet: the study waits for one, visibly (test_late_images.py: what then)
        ("no-media", "waiting for the image: no pixels", "on-hold"),
        ("endpoint", "DICOMweb", "failed"),
        ("black", "not a frontal chest radiograph: near-constant image", "failed"),
        (
            "lateral",
            "not a frontal chest radiograph: lateral view: this model reads frontal",
            "failed",
        ),
    ],
)
def test_bad_input_gives_one_failed_task(
    stack: Stack, kind: str, expected: str, status: str
) -> None:
    if kind == "corrupt":
        study_id = stack.post_study(3, image=b"\x89PNG\r\n\x1a\n this is not really a png")
    elif kind == "black":
        study_id = stack.post_study(6, image=make_gray_png(np.zeros((1024, 1024), np.uint8)))
    elif kind == "lateral":
        study_id = stack.post_study(7, image=_lateral_dicom(stack))
    elif kind == "no-media":
        study_id = stack.post_study(4, image=None)
    else:
        endpoint = stack.fhir.create(
            {
                "resourceType": "Endpoint",
                "status": "active",
                "connectionType": {
                    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                    "code": "dicom-wado-rs",
                },
                "payloadType": [{"text": "DICOM"}],
                "address": "https://pacs.example.org/dicomweb",
            }
        )
        study_id = stack.post_study(5, image=None)
        study = stack.fhir.read("ImagingStudy", study_id)
        study["endpoint"] = [{"reference": f"Endpoint/{endpoint['id']}"}]
        stack.fhir.update(study)
    # The endpoint case is an update of a study first posted bare: its Task may first say
    # "no pixels", then be updated (never duplicated) with the endpoint's reason.
    task = wait_for(
        f"a failed Task saying {expected!r}",
        lambda: (
            (t := stack.task(study_id))
            and t["status"] == status
            and expected.lower() in t["statusReason"]["text"].lower()
            and t
        ),
    )
    assert task["focus"]["reference"].startswith(f"ImagingStudy/{study_id}")
    assert expected.lower() in task["statusReason"]["text"].lower()
    assert not stack.reports(study_id)
    # The worker keeps serving: a good study right after still gets its report.
    good = stack.post_study(6)
    wait_for("a report after a failure", lambda: stack.reports(good))
    assert stack.task(study_id) is not None  # still exactly one Task (checked in .task)
