"""Search by image from the similar-cases panel (issue 18): the dropped image goes to
``POST {iss}/ImagingStudy/$similar`` in a ``Parameters`` resource, with the user's token and
under the same launch rules as a text search (:meth:`AppUi.similar`): in a patient launch the
call names the launch's patient and every match is checked against it; in a user launch the
user's scopes decide. The image itself is decoded only by the service behind ``$similar``
(its input limits and gate); the app checks its size and that it is an image type first.
"""

from __future__ import annotations

import base64
from typing import Any

from cxr_errors import ImageError, ImageTooLargeError, InputError
from fhir_service.app_ui import clinical
from fhir_service.app_ui.access import PATIENT_SEARCH_PARAM
from fhir_service.app_ui.review import post_as_user
from fhir_service.app_ui.service import AppUi, FhirAnswer, _similar_rows, outcome_text
from fhir_service.app_ui.session import AppSession

#: What a dropped file may be (the pipeline's decoders: PNG, JPEG, DICOM).
IMAGE_TYPES = ("image/png", "image/jpeg", "application/dicom")
_INTEGER_PARAMS = ("count", "age-min", "age-max")


def parameters(image: bytes, content_type: str, params: dict[str, str]) -> dict[str, Any]:
    """The ``$similar`` Parameters body: the image plus the panel's filters."""
    entries: list[dict[str, Any]] = [
        {
            "name": "image",
            "valueAttachment": {
                "contentType": content_type,
                "data": base64.b64encode(image).decode("ascii"),
            },
        }
    ]
    for name, value in params.items():
        if name in _INTEGER_PARAMS and value.lstrip("-").isdigit():
            entries.append({"name": name, "valueInteger": int(value)})
        elif value in ("true", "false"):
            entries.append({"name": name, "valueBoolean": value == "true"})
        else:
            entries.append({"name": name, "valueString": value})
    return {"resourceType": "Parameters", "parameter": entries}


def check_image(ui: AppUi, image: bytes, content_type: str) -> None:
    if content_type not in IMAGE_TYPES:
        raise InputError(f"{content_type or 'this file'} is not a PNG, JPEG or DICOM image")
    if not image:
        raise ImageError("the image is empty")
    if len(image) > ui.settings.max_image_bytes:
        raise ImageTooLargeError(
            f"the image has {len(image)} bytes, more than the {ui.settings.max_image_bytes} allowed"
        )


async def post_similar(ui: AppUi, session: AppSession, body: dict[str, Any]) -> FhirAnswer:
    status, answer = await post_as_user(
        ui, session, "/ImagingStudy/$similar", body, sign_out_on_401=False
    )
    return FhirAnswer(status, answer)


async def similar_by_image(
    ui: AppUi, session: AppSession, image: bytes, content_type: str, params: dict[str, str]
) -> list[dict[str, Any]]:
    """The matches of ``image`` (already through :func:`check_image`), as
    :meth:`AppUi.similar` shows those of a text query."""
    access = ui.access(session)
    if access.mode == "user":
        answer = await post_similar(ui, session, parameters(image, content_type, params))
        _raise_for(answer)
        return await ui._user_similar_rows(session, ui._matches(access, answer), None)
    bound = {k: v for k, v in params.items() if k != "exclude-same-patient"}
    bound[PATIENT_SEARCH_PARAM] = str(access.patient)
    answer = await post_similar(ui, session, parameters(image, content_type, bound))
    _raise_for(answer)
    matches = ui._matches(access, answer)
    _, reports, observations, tasks = await ui.patient_data(session)
    rows = clinical.worklist([m for m, _ in matches], reports, observations, tasks)
    return _similar_rows(matches, rows, same=access.patient, subjects={})


def _raise_for(answer: FhirAnswer) -> None:
    if answer.status == 400 or answer.status == 422:
        raise InputError(f"the image was refused: {outcome_text(answer.body)}")
    if answer.status == 413:
        raise ImageError("the image is larger than the EHR or service accepts")
