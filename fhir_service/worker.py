"""``cxr worker`` and ``cxr reconcile`` wiring: settings → model, FHIR client, store, queue."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from fhir_service.fhir.client import FhirClient
from fhir_service.ops.database import database_url
from fhir_service.runtime import build_analyzer, build_pipeline, model_version_for
from fhir_service.settings import Settings
from subscriptions.queue import QUEUE, apply_schema, enqueue_study_sync, make_app, register_tasks
from subscriptions.reconcile import SweepResult, sweep
from vector_store.migrate import migrate
from vector_store.store import VectorStore

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, concurrency: int = 1) -> None:
    """Load the model once, then process jobs until stopped (SIGTERM/SIGINT finish the job)."""
    dsn = database_url(settings)
    apply_schema(dsn)
    migrate(dsn)
    analyzer = build_analyzer(settings)
    log.info("worker model: %s", analyzer.model_version)
    fhir = FhirClient(settings.fhir_base_url)
    pipeline = build_pipeline(settings, fhir, analyzer, VectorStore(dsn))
    app = make_app(dsn)

    def process(final: bool, study_id: str, version_id: str) -> str:
        outcome = pipeline.process(study_id, version_id, final_attempt=final)
        log.info("ImagingStudy/%s v%s: %s", study_id, version_id, outcome)
        return outcome

    def reconcile(enqueue: Callable[[str, str], bool]) -> None:
        sweep(fhir, dsn, analyzer.model_version, enqueue)

    register_tasks(app, process, reconcile)
    app.run_worker(queues=[QUEUE], concurrency=concurrency, install_signal_handlers=True, wait=True)


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
