"""``$similar`` parameter parsing and rest-hook notifications: every bad input is a clear
InputError (→ 400), never an AttributeError or TypeError (→ 500)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from cxr_errors import InputError
from fhir_service.similar import params_from_resource, parse_query
from subscriptions.receiver import parse_notification


def test_defaults_for_a_study_query() -> None:
    q = parse_query({}, study_id="42")
    assert (q.count, q.space, q.exclude_same_patient, q.finding) == (10, "clip", False, None)


def test_finding_accepts_label_code_and_system_code() -> None:
    assert parse_query({"finding": "pneumothorax"}, study_id="1").finding == "Pneumothorax"
    assert parse_query({"finding": "36118008"}, study_id="1").finding == "Pneumothorax"
    token = "http://snomed.info/sct|60046008"
    assert parse_query({"finding": token}, study_id="1").finding == "Effusion"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"count": "0"}, "count must be between 1 and 100"),
        ({"count": "100000"}, "count must be between 1 and 100"),
        ({"count": "ten"}, "count must be an integer"),
        ({"space": "pixels"}, "space must be"),
        ({"gender": "robot"}, "gender must be"),
        ({"view-position": "XY"}, "view-position must be"),
        ({"age-min": "60", "age-max": "20"}, "greater than"),
        ({"finding": "Broken heart"}, "unknown finding"),
        ({"exclude-same-patient": "maybe"}, "true or false"),
        ({"colour": "blue"}, "unknown parameter"),
    ],
)
def test_bad_parameters(params: dict[str, str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_query(params, study_id="1")


def test_text_limits() -> None:
    with pytest.raises(InputError, match="10000 characters"):
        parse_query({"text": "x" * 10_000})
    with pytest.raises(InputError, match="space=clip"):
        parse_query({"text": "effusion", "space": "densenet"})
    with pytest.raises(InputError, match="exactly one"):
        parse_query({})


def test_image_attachment_from_parameters() -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "count", "valueInteger": 3},
            {"name": "exclude-same-patient", "valueBoolean": True},
            {
                "name": "image",
                "valueAttachment": {
                    "contentType": "image/png",
                    "data": base64.b64encode(b"png bytes").decode(),
                },
            },
        ],
    }
    flat, image, ctype = params_from_resource(body)
    q = parse_query(flat, image=image, image_type=ctype)
    assert (q.count, q.exclude_same_patient, q.image) == (3, True, b"png bytes")


def test_non_image_attachment_is_refused() -> None:
    with pytest.raises(InputError, match="contentType"):
        parse_query({}, image=b"%PDF", image_type="application/pdf")
    with pytest.raises(InputError, match="Parameters"):
        params_from_resource({"resourceType": "Patient"})


@pytest.mark.parametrize(
    "body",
    [
        [],
        "Parameters",
        None,
        {"resourceType": "Parameters", "parameter": {"name": "count"}},
        {"resourceType": "Parameters", "parameter": ["count"]},
        {"resourceType": "Parameters", "parameter": [{"valueInteger": 3}]},
        {"resourceType": "Parameters", "parameter": [{"name": 7, "valueInteger": 3}]},
        {"resourceType": "Parameters", "parameter": [{"name": "count", "valueInteger": None}]},
        {"resourceType": "Parameters", "parameter": [{"name": "count", "valueX": [1]}]},
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "count", "valueInteger": 1},
                {"name": "count", "valueInteger": 2},
            ],
        },
        {"resourceType": "Parameters", "parameter": [{"name": "image", "valueAttachment": "x"}]},
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "image", "valueAttachment": {"data": 5}}],
        },
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "image", "valueAttachment": {"data": "!!not base64!!"}}],
        },
    ],
)
def test_malformed_parameters_bodies_are_input_errors(body: Any) -> None:
    with pytest.raises(InputError):
        params_from_resource(body)


@pytest.mark.parametrize("study_id", ["../metadata", "a/b", "", "x" * 65, "a b", "ü", ".", ".."])
def test_a_study_id_that_is_no_fhir_id_is_an_input_error(study_id: str) -> None:
    with pytest.raises(InputError, match="not a FHIR resource id"):
        parse_query({}, study_id=study_id)


@pytest.mark.parametrize(
    ("raw", "patient"), [("p1", "p1"), ("Patient/p-1.2", "p-1.2"), ("", None), (None, None)]
)
def test_patient_parameter(raw: str | None, patient: str | None) -> None:
    params = {} if raw is None else {"patient": raw}
    assert parse_query({**params, "text": "x"}).patient == patient


@pytest.mark.parametrize("raw", ["Group/g1", "Patient/", "..", "p 1", "Patient/p1/x"])
def test_a_bad_patient_parameter_is_an_input_error(raw: str) -> None:
    with pytest.raises(InputError, match="patient"):
        parse_query({"patient": raw, "text": "x"})


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"resourceType": "ImagingStudy", "id": "s1"},
        {"resourceType": "ImagingStudy", "id": "s1", "meta": []},
        {"resourceType": "ImagingStudy", "id": "s1", "meta": "1"},
        {"resourceType": "ImagingStudy", "id": "s1", "meta": {"versionId": {"a": 1}}},
        {"resourceType": "ImagingStudy", "id": "s1", "meta": {"versionId": True}},
        {"resourceType": "ImagingStudy", "id": "s2", "meta": {"versionId": "1"}},
    ],
)
def test_malformed_notifications_are_input_errors(body: Any) -> None:
    with pytest.raises(InputError):
        parse_notification("s1", body)


def test_a_notification_path_that_is_no_fhir_id_is_an_input_error() -> None:
    body = {
        "resourceType": "ImagingStudy",
        "meta": {"versionId": "1"},
        "status": "available",
        "subject": {"reference": "Patient/p1"},
    }
    with pytest.raises(InputError, match="not a FHIR resource id"):
        parse_notification("../x", body)
    note = parse_notification("s1", body)
    assert (note.version_id, note.status) == ("1", "available")
    with pytest.raises(InputError, match="not a valid FHIR ImagingStudy"):
        parse_notification("s1", {**body, "status": ["available"]})
