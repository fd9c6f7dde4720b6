"""``/app/api`` calls that change state in the EHR (issue 18), each with the session's CSRF
token (:func:`fhir_service.app_ui.routes.same_origin_with_token`) and the user's own token::

    POST /app/api/review/{study_id}   {"review_id", "decisions": [{"observation", "verdict",
                                       "comment"?}]} → one review transaction
    POST /app/api/upload              {"image" (base64), "content_type", "name"} → ImagingStudy
                                       + Media for the launch's patient (write scopes)
    POST /app/api/similar-image       {"image" (base64), "content_type", "params"} → $similar
                                       by image (reads only; a POST for the body's size)
    POST /app/api/analyze             {"image" (base64), "content_type", "name"} → the
                                       service's $analyze: findings NOT saved to the record
                                       (a launch without the write scopes)
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from cxr_errors import ImageError, InputError
from fhir_service.analyze import AdhocAnalysis, AnalyzeRequest
from fhir_service.api.limits import parse_json
from fhir_service.app_ui import image_search, review, uploads
from fhir_service.app_ui.clinical import adhoc_view
from fhir_service.app_ui.routes import UiDep, _api_error, _guard, _json, _session
from fhir_service.app_ui.routes import same_origin_with_token as csrf_ok
from fhir_service.app_ui.service import AppUi
from fhir_service.fhir.review import MAX_COMMENT_CHARS, ReviewDecision, ReviewError

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api")

FhirId = Annotated[str, Field(pattern=r"^[A-Za-z0-9\-.]{1,64}$")]


class DecisionIn(BaseModel):
    observation: FhirId
    verdict: Literal["agree", "disagree", "uncertain"]
    comment: Annotated[str | None, Field(max_length=MAX_COMMENT_CHARS)] = None


class ReviewIn(BaseModel):
    review_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9\-]{8,64}$")]
    decisions: Annotated[list[DecisionIn], Field(min_length=1, max_length=14)]


async def _body(request: Request) -> object:
    try:
        return parse_json(await request.body(), "the request body")
    except InputError as exc:
        raise _BadRequest(str(exc)) from exc


class _BadRequest(Exception):
    pass


@router.post("/review/{study_id}")
async def post_review(request: Request, ui: UiDep, study_id: FhirId) -> Response:
    async def run() -> Response:
        session = _session(request, ui)
        if not csrf_ok(request, ui, session):
            log.warning("refused a review without the session's CSRF token (cross-site?)")
            return _api_error(403, "missing or wrong CSRF token")
        try:
            body = ReviewIn.model_validate(await _body(request))
        except (ValidationError, _BadRequest) as exc:
            return _api_error(400, f"not a review: {exc}")
        decisions = [ReviewDecision(d.observation, d.verdict, d.comment) for d in body.decisions]
        try:
            result = await review.submit(ui, session, study_id, decisions, body.review_id)
        except ReviewError as exc:
            return _api_error(400, str(exc))
        return _json(result)

    result: Response = await _guard(run())
    return result


#: The panel's filters a search by image passes on (as for a text search).
_SIMILAR_PARAMS = {"count", "finding", "view-position", "exclude-same-patient", "space"}


class ImageQueryIn(BaseModel):
    image: Annotated[str, Field(min_length=1)]
    content_type: Annotated[str, Field(max_length=100)]
    params: dict[str, Annotated[str, Field(max_length=100)]] = Field(default_factory=dict)


def _decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _BadRequest(f"the image is not valid base64: {exc}") from exc


class UploadIn(BaseModel):
    image: Annotated[str, Field(min_length=1)]
    content_type: Annotated[str, Field(max_length=100)]
    name: Annotated[str, Field(max_length=200)] = "upload"


_ImageBody = TypeVar("_ImageBody", ImageQueryIn, UploadIn)


async def _image_in(
    request: Request, ui: AppUi, model: type[_ImageBody], what: str
) -> tuple[_ImageBody, bytes]:
    """The JSON body of a call carrying an image, and the image decoded and checked (type,
    size) like the pipeline's input. Malformed → :class:`_BadRequest` prefixed ``what``; an
    :class:`ImageError` (empty, too large) propagates to :func:`_guard` with its status."""
    try:
        body = model.model_validate(await _body(request))
        image = _decode(body.image)
        image_search.check_image(ui, image, body.content_type)
    except ImageError:
        raise
    except (ValidationError, _BadRequest, InputError) as exc:
        raise _BadRequest(f"{what}: {exc}") from exc
    return body, image


@router.post("/similar-image")
async def similar_image(request: Request, ui: UiDep) -> Response:
    async def run() -> Response:
        session = _session(request, ui)
        if not csrf_ok(request, ui, session):
            return _api_error(403, "missing or wrong CSRF token")
        try:
            body, image = await _image_in(request, ui, ImageQueryIn, "not an image query")
        except _BadRequest as exc:
            return _api_error(400, str(exc))
        params = {k: v for k, v in body.params.items() if k in _SIMILAR_PARAMS and v}
        try:
            results = await image_search.similar_by_image(
                ui, session, image, body.content_type, params
            )
        except ImageError:
            raise
        except InputError as exc:
            return _api_error(400, str(exc))
        return _json({"results": results})

    result: Response = await _guard(run())
    return result


@router.post("/upload")
async def upload(request: Request, ui: UiDep) -> Response:
    async def run() -> Response:
        session = _session(request, ui)
        if not csrf_ok(request, ui, session):
            return _api_error(403, "missing or wrong CSRF token")
        if not review.can_upload(session):
            return _api_error(
                403,
                "this launch may not write studies to the record "
                "(it needs patient/ImagingStudy.c and patient/Media.c)",
            )
        try:
            body, image = await _image_in(request, ui, UploadIn, "not an upload")
        except _BadRequest as exc:
            return _api_error(400, str(exc))
        return _json(await uploads.upload(ui, session, image, body.content_type, body.name))

    result: Response = await _guard(run())
    return result


@router.post("/analyze")
async def analyze(request: Request, ui: UiDep) -> Response:
    """An uploaded image read by this service's own ``$analyze`` (in process: the app is part
    of the service), for the launch's patient in a patient launch; nothing is written."""

    async def run() -> Response:
        session = _session(request, ui)
        if not csrf_ok(request, ui, session):
            return _api_error(403, "missing or wrong CSRF token")
        try:
            body, image = await _image_in(request, ui, UploadIn, "not an image")
        except _BadRequest as exc:
            return _api_error(400, str(exc))
        tokens = session.tokens
        patient = tokens.patient if tokens is not None and ui.mode(session) == "patient" else None
        analysis: AdhocAnalysis = request.app.state.analyze
        bundle = await run_in_threadpool(
            analysis.run, AnalyzeRequest(image, patient=patient), bound_patient=patient
        )
        return _json(adhoc_view(bundle, body.name))

    result: Response = await _guard(run())
    return result
