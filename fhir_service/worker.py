"""``cxr worker``, ``cxr reconcile`` and ``cxr status`` wiring: settings → model, FHIR client,
store, queue, metrics.

The worker survives its database going away (a PostgreSQL restart): procrastinate's worker
stops when its connection breaks, so it runs in a loop that reopens the queue and starts it
again, keeping the loaded model. A SIGTERM / SIGINT finishes the running job and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import procrastinate

from fhir_service.fhir.client import FhirClient
from fhir_service.ops.database import database_url
from fhir_service.runtime import build_analyzer, build_pipeline, model_version_for
from fhir_service.settings import Settings
from subscriptions.census import Census, requeue_stuck, take_census
from subscriptions.metrics import JobMetrics, SnapshotPublisher
from subscriptions.queue import (
    QUEUE,
    apply_schema,
    enqueue_study_sync,
    finish_sweeps,
    make_app,
    register_tasks,
    study_queued,
)
from subscriptions.reconcile import SweepResult, sweep
from vector_store.migrate import migrate
from vector_store.store import VectorStore

log = logging.getLogger(__name__)

#: How far back the periodic stuck sweep looks (``cxr status`` looks at everything).
STUCK_LOOKBACK = timedelta(days=1)
_RESTART_DELAYS_S = (1, 2, 5, 10, 20, 30)


def run_worker(settings: Settings, *, concurrency: int = 1) -> None:
    """Load the model once, then process jobs until stopped (SIGTERM/SIGINT finish the job)."""
    dsn = database_url(settings)
    apply_schema(dsn)
    migrate(dsn)
    analyzer = build_analyzer(settings)
    log.info("worker model: %s", analyzer.model_version)
    fhir = FhirClient(settings.fhir_base_url)
    metrics = JobMetrics()
    pipeline = build_pipeline(settings, fhir, analyzer, VectorStore(dsn))
    pipeline.metrics = metrics
    publisher = SnapshotPublisher(dsn, metrics.registry)
    app = make_app(dsn)

    def process(attempts: int, study_id: str, version_id: str) -> str:
        metrics.started.inc()
        metrics.running.inc()
        try:
            return pipeline.process(study_id, version_id, attempt=attempts)
        finally:
            metrics.running.dec()
            publisher.publish()

    def counted(enqueue: Callable[[str, str], bool], source: str) -> Callable[[str, str], bool]:
        def wrapped(study_id: str, version_id: str) -> bool:
            queued = enqueue(study_id, version_id)
            if queued:
                metrics.queued.labels(source=source).inc()
            return queued

        return wrapped

    def reconcile(enqueue: Callable[[str, str], bool]) -> None:
        sweep(fhir, dsn, analyzer.model_version, counted(enqueue, "sweep"))

    def stuck(enqueue: Callable[[str, str], bool]) -> None:
        census = take_census(
            fhir,
            dsn,
            analyzer.model_version,
            image_wait=settings.image_wait,
            stuck_after=settings.stuck_after,
            since=datetime.now(UTC) - STUCK_LOOKBACK,
        )
        queued = requeue_stuck(census, counted(enqueue, "stuck-sweep"))
        if census.stuck:
            log.warning("%d stuck studies, %d queued again", len(census.stuck), queued)

    register_tasks(
        app,
        process,
        reconcile,
        requeue_stuck=stuck,
        stuck_cron=_stuck_cron(settings),
        queued_again=lambda study_id: study_queued(dsn, study_id),
    )
    publisher.start()
    try:
        asyncio.run(_serve(app, concurrency))
    finally:
        publisher.stop()


def _stuck_cron(settings: Settings) -> str:
    """Look for stuck studies twice per bound, between every minute and every 5 minutes (a
    census reads every study of the last day from HAPI)."""
    minutes = max(1, min(5, int(settings.stuck_after.total_seconds() // 120)))
    return f"*/{minutes} * * * * 0"


async def _serve(app: procrastinate.App, concurrency: int) -> None:
    """Run procrastinate's worker until a signal; start it again when it stops on its own
    (a broken database connection stops it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failures = 0
    while not stop.is_set():
        started = loop.time()
        try:
            await _run_once(app, concurrency, stop)
        except Exception as exc:
            log.warning("the job queue is unreachable or broke (%s); starting again", exc)
        if stop.is_set():
            return
        failures = 0 if loop.time() - started > 60 else failures + 1
        delay = _RESTART_DELAYS_S[min(failures, len(_RESTART_DELAYS_S) - 1)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)


async def _run_once(app: procrastinate.App, concurrency: int, stop: asyncio.Event) -> None:
    async with app.open_async():
        worker = asyncio.create_task(
            app.run_worker_async(
                queues=[QUEUE], concurrency=concurrency, install_signal_handlers=False, wait=True
            )
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({worker, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            worker.cancel()  # procrastinate lets the running jobs finish first
            await asyncio.gather(worker, return_exceptions=True)
            await finish_sweeps()
            return
        stopping.cancel()
        await finish_sweeps()
        error = worker.exception()
        log.warning("the queue worker stopped: %s", error or "its database connection broke")


def run_sweep(settings: Settings, *, since: datetime | None = None) -> SweepResult:
    dsn = database_url(settings)
    apply_schema(dsn)
    app = make_app(dsn)
    with FhirClient(settings.fhir_base_url) as fhir, app.open():
        return sweep(
            fhir,
            dsn,
            model_version_for(settings),
            lambda sid, ver: enqueue_study_sync(app, sid, ver),
            since=since,
        )


def run_census(settings: Settings, *, since: datetime | None = None) -> Census:
    """The state of every study (``cxr status``)."""
    dsn = database_url(settings)
    apply_schema(dsn)
    with FhirClient(settings.fhir_base_url, timeout=120) as fhir:
        return take_census(
            fhir,
            dsn,
            model_version_for(settings),
            image_wait=settings.image_wait,
            stuck_after=settings.stuck_after,
            since=since,
        )
