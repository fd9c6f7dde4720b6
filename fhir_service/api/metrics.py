"""``/metrics``: Prometheus text format for the receiver and every worker.

The service's own counters (notifications, jobs queued by the hook) and the workers' (jobs by
outcome and failure reason, retries, POST → report latency, model pass time) are merged from
the snapshots workers publish to PostgreSQL; queue depth is read from the queue at scrape
time (:mod:`subscriptions.metrics`).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    # Collecting reads PostgreSQL: off the event loop, so the rest-hook never waits on it.
    body = await asyncio.to_thread(generate_latest, registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
