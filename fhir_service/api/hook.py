"""The rest-hook endpoint HAPI calls: ``PUT {service}/hook/ImagingStudy/{id}``.

It answers in milliseconds: HAPI gives up after 10 s and retries for only ~60 s, so the
work is queued durably and never done inline.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from fhir_service.api.limits import parse_json
from fhir_service.api.openapi import notification_route
from fhir_service.api.responses import fhir_response
from fhir_service.deps import MetricsDep, QueueDep, SettingsDep
from fhir_service.fhir.outcome import operation_outcome
from fhir_service.settings import Settings
from subscriptions.bootstrap import SECRET_HEADER
from subscriptions.queue import enqueue_study
from subscriptions.receiver import QUEUED_STATUSES, check_secret, parse_notification

log = logging.getLogger(__name__)
router = APIRouter(prefix="/hook", tags=["rest-hook"])


_DOC = notification_route("ImagingStudy")


async def authenticated_body(request: Request, settings: Settings, secret: str | None) -> Any:
    """A notification's JSON body once its secret header matched (every rest-hook)."""
    check_secret(secret, settings.subscription_secret)
    return parse_json(await request.body(), "the rest-hook body")


def info(text: str) -> JSONResponse:
    return fhir_response(operation_outcome(text, severity="information", code="informational"))


@router.put("/ImagingStudy/{study_id}", **_DOC)
@router.post("/ImagingStudy/{study_id}", **_DOC)
async def imaging_study_notification(
    study_id: str,
    request: Request,
    settings: SettingsDep,
    queue: QueueDep,
    metrics: MetricsDep,
    secret: str | None = Header(default=None, alias=SECRET_HEADER),
) -> JSONResponse:
    with metrics.rejections("ImagingStudy"):
        note = parse_notification(study_id, await authenticated_body(request, settings, secret))
    if note.status not in QUEUED_STATUSES:
        metrics.notified("ImagingStudy", "ignored")
        text = f"ImagingStudy/{study_id} is {note.status!r}; nothing queued until it is available"
        return info(text)
    queued = await enqueue_study(queue, note.study_id, note.version_id)
    metrics.notified("ImagingStudy", "queued" if queued else "duplicate")
    text = (
        f"queued ImagingStudy/{study_id}/_history/{note.version_id}"
        if queued
        else f"ImagingStudy/{study_id} is already queued (the job reads its current version)"
    )
    log.info(text)
    return info(text)
