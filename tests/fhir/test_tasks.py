"""The study's analysis Task: failed with a reason, updated on retry, completed on success."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fhir_service.fhir.identifiers import (
    task_conditional_url,
    task_identifier,
)
from fhir_service.fhir.tasks import build_completed_task, build_failed_task
from tests.factories import (
    RECORDED,
    make_study,
)

Resource = dict[str, Any]
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
UCUM = "http://unitsofmeasure.org"

# Element names of R4 (4.0.1), to catch misspelt keys that HAPI would reject as unknown.
_COMMON = {
    "resourceType",
    "id",
    "meta",
    "implicitRules",
    "language",
    "text",
    "contained",
    "extension",
    "modifierExtension",
}
R4_ELEMENTS = {
    "Device": _COMMON
    | {
        "identifier", "definition", "udiCarrier", "status", "statusReason", "distinctIdentifier",
        "manufacturer", "manufactureDate", "expirationDate", "lotNumber", "serialNumber",
        "deviceName", "modelNumber", "partNumber", "type", "specialization", "version",
        "property", "patient", "owner", "contact", "location", "url", "note", "safety", "parent",
    },
    "Observation": _COMMON
    | {
        "identifier", "basedOn", "partOf", "status", "category", "code", "subject", "focus",
        "encounter", "effectiveDateTime", "issued", "performer", "valueQuantity",
        "dataAbsentReason", "interpretation", "note", "bodySite", "method", "specimen", "device",
        "referenceRange", "hasMember", "derivedFrom", "component",
    },
    "Media": _COMMON
    | {
        "identifier", "basedOn", "partOf", "status", "type", "modality", "view", "subject",
        "encounter", "createdDateTime", "issued", "operator", "reasonCode", "bodySite",
        "deviceName", "device", "height", "width", "frames", "duration", "content", "note",
    },
    "DiagnosticReport": _COMMON
    | {
        "identifier", "basedOn", "status", "category", "code", "subject", "encounter",
        "effectiveDateTime", "issued", "performer", "resultsInterpreter", "specimen", "result",
        "imagingStudy", "media", "conclusion", "conclusionCode", "presentedForm",
    },
    "Provenance": _COMMON
    | {
        "target", "occurredDateTime", "recorded", "policy", "location", "reason", "activity",
        "agent", "entity", "signature",
    },
    "Task": _COMMON
    | {
        "identifier", "basedOn", "groupIdentifier", "partOf", "status", "statusReason",
        "businessStatus", "intent", "priority", "code", "description", "focus", "for",
        "encounter", "executionPeriod", "authoredOn", "lastModified", "requester", "owner",
        "reasonCode", "note", "input", "output",
    },
}  # fmt: skip


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
