"""Images that come after their study, and studies whose status changes, with the real stack.

A PACS-fed EHR registers the ImagingStudy before the pixels exist and posts the Media after
it. The session's worker waits CXR_IMAGE_WAIT = 30 s for an image (tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from fhir_service.fhir.tasks import task_business_status, waiting_deadline
from subscriptions.lifecycle import study_deadline
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration


def _task_in(stack: Stack, study_id: str, status: str, code: str | None = None) -> Any:
    def probe() -> Any:
        task = stack.task(study_id)
        if (
            task
            and task["status"] == status
            and (code is None or task_business_status(task) == code)
        ):
            return task
        return None

    return wait_for(f"ImagingStudy/{study_id}'s Task to be {status} {code or ''}", probe)


def test_six_studies_posted_before_their_images_all_get_one_report(stack: Stack) -> None:
    """The issue's case: study first (plain REST), image second — 3 of 6 were lost before."""
    studies = [stack.post_study(20 + i, image=None) for i in range(6)]
    for i, sid in enumerate(studies):
        stack.post_image(sid, 20 + i)
    for sid in studies:
        wait_for(f"a report for {sid}", lambda sid=sid: stack.reports(sid), timeout_s=240)
    wait_for("the queue to drain", stack.drained, timeout_s=180)
    for sid in studies:
        assert len(stack.reports(sid)) == len(stack.current_reports(sid)) == 1
        task = stack.task(sid)
        # either the job ran after the image (no Task) or it waited first (Task completed)
        assert task is None or task["status"] == "completed", task


def test_a_study_waits_visibly_then_its_image_gives_the_report(stack: Stack) -> None:
    wait_for("the queue to drain", stack.drained, timeout_s=180)
    sid = stack.post_study(26, image=None)
    task = _task_in(stack, sid, "on-hold", "waiting-for-images")
    study = stack.fhir.read("ImagingStudy", sid)
    assert waiting_deadline(task) == study_deadline(study, stack.settings.image_wait)
    assert "waiting for the image" in task["statusReason"]["text"]
    stack.post_image(sid, 26)
    wait_for("the report", lambda: stack.reports(sid))
    done = _task_in(stack, sid, "completed")
    assert "arrived while the study was waiting" in done["statusReason"]["text"]
    assert done["output"][0]["valueReference"]["reference"] == (
        f"DiagnosticReport/{stack.reports(sid)[0]['id']}"
    )
    assert len(stack.reports(sid)) == len(stack.current_reports(sid)) == 1


def test_no_image_in_time_fails_and_a_late_image_still_reports(stack: Stack) -> None:
    sid = stack.post_study(27, image=None)
    _task_in(stack, sid, "on-hold", "waiting-for-images")
    # the wait (30 s) runs out; the worker's sweep (every 30 s) fails the study
    failed = wait_for(
        "the wait to run out",
        lambda: (t := stack.task(sid)) and t["status"] == "failed" and t,
        timeout_s=180,
    )
    assert task_business_status(failed) == "no-pixels"
    assert "none arrived within 30 s" in failed["statusReason"]["text"]
    assert not stack.reports(sid)
    stack.post_image(sid, 27)
    wait_for("the late report", lambda: stack.reports(sid))
    closed = _task_in(stack, sid, "completed")
    assert "earlier failure" in closed["statusReason"]["text"]
    assert "none arrived within 30 s" in closed["statusReason"]["text"]
    wait_for("the queue to drain", stack.drained, timeout_s=180)
    assert len(stack.reports(sid)) == len(stack.current_reports(sid)) == 1


def test_registered_waits_and_available_goes(stack: Stack) -> None:
    wait_for("the queue to drain", stack.drained, timeout_s=180)
    sid = stack.post_study(28, "real")
    # post_study makes it available; register a second study with its image, not available
    from fhir_service.ingest.transaction import created_id, study_bundle
    from tests.factories import unique_suffix

    rec = stack.records[29]
    image = (stack.settings.shared_dir / "data" / "nih-sample" / rec.image_index).read_bytes()
    bundle = study_bundle(rec, image, tag=unique_suffix(), status="registered")
    registered = created_id(stack.fhir.transaction(bundle), "ImagingStudy")
    wait_for("the available one's report", lambda: stack.reports(sid))
    wait_for("the queue to drain", stack.drained, timeout_s=120)
    # its image's notification queued a job, which left it alone: nothing written
    assert not stack.reports(registered)
    assert stack.task(registered) is None
    study = stack.fhir.read("ImagingStudy", registered)
    stack.fhir.update({**study, "status": "available"})
    wait_for("the report once available", lambda: stack.reports(registered))


def test_withdrawn_studies(stack: Stack) -> None:
    # cancelled while waiting for its image: the waiting Task is cancelled
    waiting = stack.post_study(30, image=None)
    _task_in(stack, waiting, "on-hold")
    study = stack.fhir.read("ImagingStudy", waiting)
    stack.fhir.update({**study, "status": "cancelled"})
    cancelled = _task_in(stack, waiting, "cancelled", "withdrawn")
    assert "'cancelled'" in cancelled["statusReason"]["text"]
    # entered in error after its report: every result of ours is marked entered-in-error
    sid = stack.post_study(31)
    report = wait_for("a report", lambda: stack.reports(sid))[0]
    study = stack.fhir.read("ImagingStudy", sid)
    stack.fhir.update({**study, "status": "entered-in-error"})
    marked = wait_for(
        "the report marked entered-in-error",
        lambda: (
            (r := stack.fhir.read("DiagnosticReport", report["id"]))["status"] == "entered-in-error"
            and r
        ),
    )
    assert marked["status"] == "entered-in-error"
    # and out of the similar-case index before that: $similar never offers it as a prior case
    with psycopg.connect(stack.dsn) as conn:
        row = conn.execute("SELECT 1 FROM study_embeddings WHERE study_id = %s", (sid,))
        assert row.fetchone() is None
    study_ref = f"ImagingStudy/{sid}"
    observations = list(stack.fhir.search_all("Observation", {"derived-from": study_ref}))
    assert len(observations) == 14
    assert {o["status"] for o in observations} == {"entered-in-error"}
    from fhir_service.fhir.results import is_cxr_overlay

    media = list(stack.fhir.search_all("Media", {"part-of": study_ref}))
    assert {m["status"] for m in media if is_cxr_overlay(m)} <= {"entered-in-error"}
    assert [m["status"] for m in media if not is_cxr_overlay(m)] == ["completed"]
