"""``cxr serve``, ``cxr worker`` and ``cxr reconcile``."""

from __future__ import annotations

import logging
from datetime import datetime

import typer

from fhir_service.cli._common import cli_errors, console
from fhir_service.settings import get_settings

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(worker)
    app.command()(reconcile)


def serve(
    host: str | None = typer.Option(None, help="Bind address (default CXR_SERVICE_HOST)."),
    port: int | None = typer.Option(None, help="Port (default CXR_SERVICE_PORT)."),
) -> None:
    """Run the service: rest-hook receiver, /healthz (and the FHIR operations)."""
    import uvicorn

    from fhir_service.app import create_app
    from fhir_service.ops.database import start_database
    from fhir_service.runtime import model_version_for

    settings = get_settings()
    with cli_errors():
        # Refuse to start without weights (unless CXR_MODEL_WEIGHTS=untrained): the error
        # names the file and directory, instead of a traceback from inside uvicorn.
        model_version_for(settings)
        start_database(settings)
        app = create_app(settings)
    uvicorn.run(
        app,
        host=host or settings.service_host,
        port=port or settings.service_port,
        log_level="info",
        access_log=False,
    )


def worker(
    concurrency: int = typer.Option(1, help="Jobs run at once in this process."),
) -> None:
    """Run a worker: takes study jobs from the queue and writes results to FHIR."""
    from fhir_service.worker import run_worker

    with cli_errors():
        run_worker(get_settings(), concurrency=concurrency)


def reconcile(
    since: datetime | None = typer.Option(
        None, help="Sweep studies updated after this time (ISO 8601) instead of the watermark."
    ),
) -> None:
    """Queue every available study that has no report for the current model (nor a failed Task),
    the studies whose wait for an image ran out, those an image arrived for, and those waiting
    for their image in the PACS."""
    from fhir_service.worker import run_sweep

    with cli_errors():
        result = run_sweep(get_settings(), since=since)
    console.print(
        f"seen {result.seen}, queued {result.queued}, already reported {result.reported}, "
        f"failed earlier {result.failed}; waits expired {result.expired}, late images "
        f"{result.late_images}, PACS rechecks {result.pacs_rechecks}; watermark {result.watermark}"
    )
