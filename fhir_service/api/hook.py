"""The rest-hook endpoint HAPI calls: ``PUT {service}/hook/ImagingStudy/{id}``.

It answers in milliseconds: HAPI gives up after 10 s and retries for only ~60 s, so the
work is queued durably and never done inline.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from cxr_errors import InputError
from fhir_service.api.responses import fhir_response
from fhir_service.deps import MetricsDep, QueueDep, SettingsDep
from fhir_service.fhir.outcome import operation_outcome
from subscriptions.bootstrap import SECRET_HEADER
from subscriptions.queue import enqueue_study
from subscriptions.receiver import QUEUED_STATUSES, check_secret, parse_notification

log = logging.getLogger(__name__)
router = APIRouter(prefix="/hook", tags=["rest-hook"])


@router.put("/ImagingStudy/{study_id}")
@router.post("/ImagingStudy/{study_id}")
async def imaging_study_notification(
    study_id: str,
    request: Request,
    settings: SettingsDep,
    queue: QueueDep,
    metrics: MetricsDep,
    secret: str | None = Header(default=None, alias=SECRET_HEADER),
) -> JSONResponse:
    with metrics.rejections("ImagingStudy"):
        check_secret(secret, settings.subscription_secret)
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise InputError(f"rest-hook body is not JSON: {exc}") from exc
        note = parse_notification(study_id, body)
    if note.status not in QUEUED_STATUSES:
        metrics.notified("ImagingStudy", "ignored")
        text = f"ImagingStudy/{study_id} is {note.status!r}; nothing queued until it is available"
        return fhir_response(operation_outcome(text, severity="information", code="informational"))
    queued = await enqueue_study(queue, note.study_id, note.version_id)
    metrics.notified("ImagingStudy", "queued" if queued else "duplicate")
    text = (
        f"queued ImagingStudy/{study_id}/_history/{note.version_id}"
        if queued
        else f"ImagingStudy/{study_id}/_history/{note.version_id} is already queued"
    )
    log.info(text)
    return fhir_response(operation_outcome(text, severity="information", code="informational"))
