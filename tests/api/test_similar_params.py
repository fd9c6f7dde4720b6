"""``$similar`` parameter parsing: every bad input is a clear InputError (→ 400)."""

from __future__ import annotations

import base64

import pytest

from cxr_errors import InputError
from fhir_service.similar import params_from_resource, parse_query


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
