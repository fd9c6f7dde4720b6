"""The study's analysis Task: failed with a reason, updated on retry, completed on success."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fhir_service.fhir.identifiers import (
    task_conditional_url,
    task_identifier,
)
from fhir_service.fhir.tasks import (
    WAITING_FOR_IMAGES,
    build_cancelled_task,
    build_completed_task,
    build_failed_task,
    build_waiting_task,
    task_business_status,
    waiting_deadline,
)
from tests.factories import (
    RECORDED,
    make_study,
)
from tests.fhir.r4 import R4_ELEMENTS

# --- failure Task ---------------------------------------------------------------------------


def test_failed_task_shape() -> None:
    task = build_failed_task(
        make_study(),
        "pixel data is not a decodable image: truncated PNG",
        "undecodable-image",
        now=RECORDED,
    )
    assert set(task) <= R4_ELEMENTS["Task"]
    assert task["status"] == "failed" and task["intent"] == "order"
    assert task["focus"] == {"reference": "ImagingStudy/cxr-1"}
    assert task["for"] == {"reference": "Patient/p1"}
    assert task["statusReason"] == {"text": "pixel data is not a decodable image: truncated PNG"}
    assert task["businessStatus"]["coding"][0]["code"] == "undecodable-image"
    assert task["identifier"] == [
        {"system": task_identifier("cxr-1")[0], "value": "cxr-1"},
    ]
    assert task["lastModified"] == task["authoredOn"] == "2025-01-02T03:04:05.000+00:00"
    assert "truncated PNG" in task["description"] and "version 3" in task["description"]
    assert "id" not in task
    assert task_conditional_url("cxr-1") == (
        "Task?identifier=https://cxr-fhir.example.org/fhir/NamingSystem/cxr-analysis-task|cxr-1"
    )


def test_retry_updates_the_same_task() -> None:
    first = build_failed_task(make_study(), "no Media with pixels", "no-pixels", now=RECORDED)
    stored = {**first, "id": "t9", "meta": {"versionId": "1"}}
    later = RECORDED + timedelta(minutes=3)
    again = build_failed_task(
        make_study(version="4"),
        "pixel data is not a decodable image: truncated PNG",
        "undecodable-image",
        now=later,
        existing_task=stored,
    )
    assert again["id"] == "t9"
    assert again["identifier"] == first["identifier"]
    assert again["authoredOn"] == first["authoredOn"]
    assert again["lastModified"] == "2025-01-02T03:07:05.000+00:00"
    assert again["statusReason"]["text"].endswith("truncated PNG")


def test_task_time_defaults_to_now() -> None:
    before = datetime.now(UTC)
    task = build_failed_task(make_study(), "no Media with pixels", "no-pixels")
    assert datetime.fromisoformat(task["lastModified"]) >= before.replace(microsecond=0)
    done = build_completed_task(task)
    assert datetime.fromisoformat(done["lastModified"]) >= before.replace(microsecond=0)


def test_failed_task_input_checks() -> None:
    with pytest.raises(ValueError, match="reason"):
        build_failed_task(make_study(), "  ", "no-pixels", now=RECORDED)
    with pytest.raises(ValueError, match="business_status"):
        build_failed_task(make_study(), "why", "No Pixels", now=RECORDED)


def test_completed_task() -> None:
    failed = {
        **build_failed_task(make_study(), "no Media with pixels", "no-pixels", now=RECORDED),
        "id": "t9",
        "meta": {"versionId": "2"},
    }
    done = build_completed_task(
        failed, now=datetime(2025, 2, 1, tzinfo=UTC), report_reference="DiagnosticReport/r7"
    )
    assert set(done) <= R4_ELEMENTS["Task"]
    assert done["status"] == "completed" and done["id"] == "t9"
    assert "statusReason" not in done and "meta" not in done
    assert done["businessStatus"]["coding"][0]["code"] == "completed"
    assert done["output"][0]["valueReference"] == {"reference": "DiagnosticReport/r7"}
    assert done["identifier"] == failed["identifier"]
    assert done["lastModified"] == "2025-02-01T00:00:00.000+00:00"
    assert failed["status"] == "failed"


def test_waiting_task_is_on_hold_with_its_deadline() -> None:
    deadline = datetime(2025, 1, 2, 3, 19, 5, tzinfo=UTC)
    task = build_waiting_task(make_study(), "waiting for the image", deadline, now=RECORDED)
    assert set(task) <= R4_ELEMENTS["Task"]
    assert task["status"] == "on-hold"
    assert task_business_status(task) == WAITING_FOR_IMAGES
    assert task["restriction"] == {"period": {"end": "2025-01-02T03:19:05.000+00:00"}}
    assert waiting_deadline(task) == deadline
    assert task["statusReason"]["text"] == "waiting for the image"
    assert "is waiting for its image" in task["description"]
    # a failed or completed Task has no deadline
    assert waiting_deadline(build_failed_task(make_study(), "x", "no-pixels")) is None
    assert waiting_deadline(build_completed_task({**task, "id": "t1"})) is None


def test_waiting_then_failed_keeps_the_one_task() -> None:
    deadline = RECORDED + timedelta(minutes=15)
    waiting = {**build_waiting_task(make_study(), "waiting", deadline, now=RECORDED), "id": "t3"}
    failed = build_failed_task(
        make_study(), "no image", "no-pixels", now=deadline, existing_task=waiting
    )
    assert failed["id"] == "t3" and failed["authoredOn"] == waiting["authoredOn"]
    assert "restriction" not in failed


def test_completed_task_can_say_why() -> None:
    failed = {**build_failed_task(make_study(), "no image", "no-pixels", now=RECORDED), "id": "t"}
    done = build_completed_task(failed, reason="completed after an earlier failure: no image")
    assert done["statusReason"] == {"text": "completed after an earlier failure: no image"}


def test_cancelled_task_for_a_withdrawn_study() -> None:
    waiting = {
        **build_waiting_task(make_study(), "waiting", RECORDED + timedelta(minutes=5)),
        "id": "t4",
        "meta": {"versionId": "1"},
    }
    cancelled = build_cancelled_task(waiting, "the study was withdrawn", now=RECORDED)
    assert set(cancelled) <= R4_ELEMENTS["Task"]
    assert cancelled["status"] == "cancelled" and cancelled["id"] == "t4"
    assert task_business_status(cancelled) == "withdrawn"
    assert cancelled["statusReason"]["text"] == "the study was withdrawn"
    assert "restriction" not in cancelled and "meta" not in cancelled
    with pytest.raises(ValueError, match="reason"):
        build_cancelled_task(waiting, " ")


def test_a_completed_task_is_never_modified_before_it_was_authored() -> None:
    # FHIR's inv-1 (HAPI refuses the Task): a result recorded a moment before the Task was
    # written (a worker clock behind HAPI's, a replayed run) still closes it.
    failed = {**build_failed_task(make_study(), "no image", "no-pixels", now=RECORDED), "id": "t"}
    done = build_completed_task(failed, now=RECORDED - timedelta(seconds=3))
    assert done["lastModified"] == done["authoredOn"] == "2025-01-02T03:04:05.000+00:00"
    unreadable = build_completed_task({**failed, "authoredOn": "2025-01-02"}, now=RECORDED)
    assert unreadable["lastModified"] == "2025-01-02T03:04:05.000+00:00"
