"""Search by image from the app: the Parameters body, and what is refused before any call."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from cxr_errors import ImageError, InputError
from fhir_service.app_ui.image_search import check_image, parameters
from fhir_service.app_ui.service import AppUi
from fhir_service.settings import Settings


def test_parameters_carry_the_image_and_typed_filters() -> None:
    body = parameters(
        b"\x89PNG", "image/png", {"count": "5", "exclude-same-patient": "true", "finding": "Mass"}
    )
    assert body["resourceType"] == "Parameters"
    image, *rest = body["parameter"]
    assert image == {
        "name": "image",
        "valueAttachment": {
            "contentType": "image/png",
            "data": base64.b64encode(b"\x89PNG").decode(),
        },
    }
    assert rest == [
        {"name": "count", "valueInteger": 5},
        {"name": "exclude-same-patient", "valueBoolean": True},
        {"name": "finding", "valueString": "Mass"},
    ]


def test_only_images_of_allowed_size(tmp_path: Path) -> None:
    ui = AppUi(Settings(data_dir=tmp_path, max_image_bytes=10))
    check_image(ui, b"12345", "image/png")
    with pytest.raises(InputError, match="not a PNG, JPEG or DICOM"):
        check_image(ui, b"12345", "text/plain")
    with pytest.raises(ImageError, match="more than the 10 allowed"):
        check_image(ui, b"x" * 11, "application/dicom")
    with pytest.raises(ImageError, match="empty"):
        check_image(ui, b"", "image/jpeg")
