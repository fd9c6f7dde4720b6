"""The rest-hook endpoint for images: ``PUT {service}/hook/Media/{id}``.

A PACS-fed EHR registers the ImagingStudy before its pixels exist and posts the Media after
it; the study's own notification then finds no image and the study waits
(:mod:`subscriptions.lifecycle`). This endpoint queues the studies a new Media is ``partOf``,
so the wait ends as soon as the image is there — also after the wait ran out and the study
failed. Our own heatmap Media arrive here too and are ignored.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from fhir_service.api.hook import authenticated_body, info
from fhir_service.api.openapi import notification_route
from fhir_service.deps import MetricsDep, QueueDep, SettingsDep
from subscriptions.bootstrap import SECRET_HEADER
from subscriptions.queue import enqueue_study
from subscriptions.receiver import parse_media_notification

log = logging.getLogger(__name__)
router = APIRouter(prefix="/hook", tags=["rest-hook"])


_DOC = notification_route("Media")


@router.put("/Media/{media_id}", **_DOC)
@router.post("/Media/{media_id}", **_DOC)
async def media_notification(
    media_id: str,
    request: Request,
    settings: SettingsDep,
    queue: QueueDep,
    metrics: MetricsDep,
    secret: str | None = Header(default=None, alias=SECRET_HEADER),
) -> JSONResponse:
    with metrics.rejections("Media"):
        body = await authenticated_body(request, settings, secret)
        note = parse_media_notification(media_id, body)
    if note.ours or not note.study_ids:
        metrics.notified("Media", "ignored")
        why = "a heatmap written by cxr-fhir" if note.ours else "not partOf an ImagingStudy"
        return info(f"Media/{media_id} is {why}; nothing queued")
    # The job reads the study (and finds this image) as it is when it runs; the Media's
    # version only keeps its queueing key apart from the study's own notifications.
    trigger = f"Media/{media_id}/_history/{note.version_id}"
    queued = [sid for sid in note.study_ids if await enqueue_study(queue, sid, trigger)]
    metrics.notified("Media", "queued" if queued else "duplicate", queued=len(queued))
    studies = ", ".join(f"ImagingStudy/{sid}" for sid in note.study_ids)
    text = f"Media/{media_id}: queued {studies}" if queued else f"{studies} already queued"
    log.info(text)
    return info(text)
