"""FHIR JSON responses, and the one handler that turns a CxrError into an OperationOutcome."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from cxr_errors import CxrError, UnauthorizedError
from fhir_service.fhir.outcome import operation_outcome

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


def fhir_response(body: dict[str, Any], status_code: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, media_type=FHIR_JSON)


async def cxr_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CxrError)
    severity = "error" if exc.http_status < 500 else "fatal"
    response = fhir_response(
        operation_outcome(exc.message, severity=severity, code=exc.issue_code), exc.http_status
    )
    if isinstance(exc, UnauthorizedError):
        # RFC 6750 §3: a bearer-token resource says how to authenticate.
        response.headers["WWW-Authenticate"] = 'Bearer realm="cxr-fhir", error="invalid_token"'
    return response


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return fhir_response(operation_outcome("; ".join(parts), code="invalid"), 400)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: logged with its traceback, answered as a FHIR 500 that names
    nothing of the internals."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return fhir_response(
        operation_outcome("internal error; see the service log", severity="fatal"), 500
    )
