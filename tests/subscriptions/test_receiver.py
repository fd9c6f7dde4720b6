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


def test_a_media_notification_names_the_studies_it_is_part_of() -> None:
    from subscriptions.receiver import parse_media_notification

    media = {
        "resourceType": "Media",
        "id": "m1",
        "meta": {"versionId": "2"},
        "status": "completed",
        "partOf": [
            {"reference": "ImagingStudy/s1"},
            {"reference": "ImagingStudy/s1/_history/3"},
            {"reference": "Procedure/x"},
            {"reference": "ImagingStudy/s2"},
        ],
        "content": {"contentType": "image/png", "data": "AA=="},
    }
    note = parse_media_notification("m1", media)
    assert note.study_ids == ("s1", "s2") and not note.ours and note.version_id == "2"
    alone = parse_media_notification("m1", {**media, "partOf": []})
    assert alone.study_ids == ()
    with pytest.raises(InputError, match="does not match"):
        parse_media_notification("m2", media)


def test_our_heatmaps_are_recognised_and_ignored() -> None:
    from fhir_service.fhir.terminology import TERMINOLOGY
    from subscriptions.receiver import parse_media_notification

    heatmap = {
        "resourceType": "Media",
        "id": "h1",
        "meta": {"versionId": "1"},
        "status": "completed",
        "identifier": [{"system": TERMINOLOGY.identifier_system("heatmap"), "value": "k.x"}],
        "partOf": [{"reference": "ImagingStudy/s1"}],
        "content": {"contentType": "image/png", "data": "AA=="},
    }
    note = parse_media_notification("h1", heatmap)
    assert note.ours and note.study_ids == ()
