"""``$analyze`` at ``{service}/fhir``: an uploaded image read without saving anything
(:mod:`fhir_service.analyze`). Authenticated like ``$similar``; a patient-context token
analyses for its own patient only."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from fhir_service.analyze import parse_analyze
from fhir_service.api.limits import parse_json
from fhir_service.api.openapi import BEARER, COLLECTION, PARAMETERS_BODY, responses
from fhir_service.api.responses import fhir_response
from fhir_service.deps import AnalyzeDep, AuthDep

router = APIRouter(prefix="/fhir", tags=["$analyze"])


@router.post(
    "/$analyze",
    responses=responses(COLLECTION, 400, 401, 403, 413, 422, 503),
    openapi_extra={"requestBody": {**PARAMETERS_BODY, "required": True}, "security": BEARER},
)
async def analyze(request: Request, analysis: AnalyzeDep, auth: AuthDep) -> JSONResponse:
    caller = await auth.caller(request.headers.get("authorization"))
    query = parse_analyze(parse_json(await request.body(), "the POST body"))
    bundle = await run_in_threadpool(analysis.run, query, bound_patient=caller.patient)
    return fhir_response(bundle)
