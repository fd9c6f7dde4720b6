"""``$similar`` at ``{service}/fhir``: instance level (by study) and type level (text, image).

Every call is authenticated first (:mod:`fhir_service.api.auth`); a patient-context token
gets its own patient's studies only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from cxr_errors import InputError
from fhir_service.api.limits import parse_json
from fhir_service.api.openapi import SEARCHSET, responses, similar_openapi
from fhir_service.api.responses import fhir_response
from fhir_service.deps import AuthDep, SettingsDep, SimilarDep
from fhir_service.similar import params_from_resource, parse_query

router = APIRouter(prefix="/fhir", tags=["$similar"])


async def _inputs(request: Request) -> tuple[dict[str, str], bytes | None, str]:
    params = dict(request.query_params)
    if request.method == "POST":
        raw = await request.body()
        if raw:
            body: Any = parse_json(raw, "the POST body")
            flat, image, image_type = params_from_resource(body)
            clash = set(flat) & set(params)
            if clash:
                raise InputError(f"parameter(s) given twice: {sorted(clash)}")
            return {**params, **flat}, image, image_type
    return params, None, ""


def _base(request: Request, settings: SettingsDep) -> str:
    return f"{settings.service_url}/fhir"


_STATUSES = (400, 401, 403, 404, 413, 422, 502, 503)


@router.get(
    "/ImagingStudy/{study_id}/$similar",
    responses=responses(SEARCHSET, *_STATUSES),
    openapi_extra=similar_openapi(text=False, body=False),
)
@router.post(
    "/ImagingStudy/{study_id}/$similar",
    responses=responses(SEARCHSET, *_STATUSES),
    openapi_extra=similar_openapi(text=False, body=True),
)
async def similar_to_study(
    study_id: str, request: Request, settings: SettingsDep, service: SimilarDep, auth: AuthDep
) -> JSONResponse:
    caller = await auth.caller(request.headers.get("authorization"))
    params, image, _ = await _inputs(request)
    if image is not None:
        raise InputError("instance-level $similar takes no image; POST to ImagingStudy/$similar")
    query = parse_query(params, study_id=study_id)
    bundle = await run_in_threadpool(
        service.run, query, _base(request, settings), bound_patient=caller.patient
    )
    return fhir_response(bundle)


@router.get(
    "/ImagingStudy/$similar",
    responses=responses(SEARCHSET, *_STATUSES),
    openapi_extra=similar_openapi(text=True, body=False),
)
@router.post(
    "/ImagingStudy/$similar",
    responses=responses(SEARCHSET, *_STATUSES),
    openapi_extra=similar_openapi(text=True, body=True),
)
async def similar_by_text_or_image(
    request: Request, settings: SettingsDep, service: SimilarDep, auth: AuthDep
) -> JSONResponse:
    caller = await auth.caller(request.headers.get("authorization"))
    params, image, image_type = await _inputs(request)
    query = parse_query(params, image=image, image_type=image_type)
    bundle = await run_in_threadpool(
        service.run, query, _base(request, settings), bound_patient=caller.patient
    )
    return fhir_response(bundle)
