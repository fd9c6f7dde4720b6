"""The rest-hook receiver's logic without HTTP: the secret and the notification body."""

from __future__ import annotations

from typing import Any

import pytest

from cxr_errors import InputError
from fhir_service.fhir.inbound import MalformedResource
from subscriptions.receiver import Unauthorized, check_secret, parse_notification

SECRET = "s3cret-value"


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": "42",
        "meta": {"versionId": "3"},
        "status": "available",
        "subject": {"reference": "Patient/7"},
        **extra,
    }


def test_the_right_secret_passes() -> None:
    check_secret(SECRET, SECRET)


@pytest.mark.parametrize("given", [None, "", "s3cret-valuf", "s3cret-value ", SECRET[:-1], "ü"])
def test_a_missing_or_wrong_secret_is_401(given: str | None) -> None:
    with pytest.raises(Unauthorized) as raised:
        check_secret(given, SECRET)
    assert raised.value.http_status == 401


def test_a_notification_names_the_study_its_version_and_status() -> None:
    note = parse_notification("42", _body())
    assert (note.study_id, note.version_id, note.status) == ("42", "3", "available")


def test_the_body_id_must_match_the_url() -> None:
    with pytest.raises(InputError, match="does not match the URL id"):
        parse_notification("43", _body())


def test_a_body_without_version_is_refused() -> None:
    with pytest.raises(InputError, match=r"meta\.versionId"):
        parse_notification("42", _body(meta={}))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "not a FHIR resource"),
        ("ImagingStudy", "not a FHIR resource"),
        ({"resourceType": "Patient", "id": "42"}, "is a Patient, not a ImagingStudy"),
        ({"id": "42"}, "resource without resourceType"),
    ],
)
def test_a_body_that_is_not_an_imaging_study_is_refused(body: Any, message: str) -> None:
    with pytest.raises(MalformedResource, match=message):
        parse_notification("42", body)


def test_a_malformed_study_is_refused_naming_the_field() -> None:
    with pytest.raises(MalformedResource) as raised:
        parse_notification("42", _body(subject={"reference": 7}))
    assert "subject.reference" in raised.value.message
    assert raised.value.http_status == 400


def test_a_study_without_subject_is_refused_naming_the_field() -> None:
    body = _body()
    del body["subject"]
    with pytest.raises(MalformedResource, match="subject: Field required"):
        parse_notification("42", body)
