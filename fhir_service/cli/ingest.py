"""``cxr ingest nih``: bulk-load NIH ChestX-ray14 (metadata, any subset of images) into FHIR."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fhir_service.cli._common import cli_errors, console
from fhir_service.fhir_client import FhirClient
from fhir_service.ingest import IngestOptions, IngestReport, ingest
from fhir_service.ingest import Progress as IngestProgress
from fhir_service.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True)


@app.command()
def nih(
    metadata: Path | None = typer.Option(
        None,
        "--metadata",
        help="Data_Entry_2017*.csv(.gz) or a sample manifest.csv "
        "(default: the copy inside the installed torchxrayvision).",
    ),
    images: Path | None = typer.Option(
        None, "--images", help="Folder with (any subset of) the NIH PNGs, searched recursively."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N rows."),
    concurrency: int | None = typer.Option(
        None, "--concurrency", min=1, help="Transactions in flight (default CXR_INGEST_CONCURRENCY)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Studies per transaction (default CXR_INGEST_BATCH_SIZE)."
    ),
    bulk_inference: bool = typer.Option(
        False,
        "--bulk-inference",
        help="Run the model on studies with images here, batch by batch, instead of waiting "
        "for the worker (same pipeline, same idempotent results).",
    ),
    report: Path | None = typer.Option(
        None, "--report", help="Write the machine-readable report (JSON) here."
    ),
    restart: bool = typer.Option(
        False, "--restart", help="Ignore the progress of an earlier run of the same file."
    ),
) -> None:
    """Load NIH ChestX-ray14: one Patient per patient, one ImagingStudy (+ Media) per image."""
    from fhir_service import nih as nih_meta

    settings = get_settings()
    with cli_errors():
        options = IngestOptions(
            metadata=metadata or nih_meta.default_metadata_path(),
            state_dir=settings.ingest_state_dir or settings.data_dir / "ingest",
            images=images,
            limit=limit,
            batch_size=batch_size or settings.ingest_batch_size,
            concurrency=concurrency or settings.ingest_concurrency,
            resume=not restart,
            max_image_bytes=settings.max_image_bytes,
        )
        if images is not None and not images.is_dir():
            from cxr_errors import InputError

            raise InputError(f"--images {images} is not a directory")
        process = _bulk_pipeline(settings) if bulk_inference else None
        console.print(f"ingesting [bold]{options.metadata}[/] into {settings.fhir_base_url}")
        # Enough pooled connections for every worker thread (httpx's default is plenty, but
        # a long transaction should never wait for a connection).
        with FhirClient(settings.fhir_base_url, timeout=300) as fhir, _progress_bar() as bar:
            task = bar.add_task("rows", total=None)

            def on_progress(p: IngestProgress) -> None:
                bar.update(task, total=p.rows_total, completed=p.rows_done)

            result = ingest(fhir, options, progress=on_progress, process_study=process)
    _print_summary(result)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.as_json(), indent=2) + "\n")
        console.print(f"report written to {report}")
    if result.failed:
        raise typer.Exit(1)


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        # task.speed is rows/s over rich's recent window, so it tracks the current rate.
        TextColumn("{task.speed:>7.1f} rows/s" if False else "[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _bulk_pipeline(settings: Settings) -> Callable[[str, str], str]:
    """The worker's own pipeline, in this process: same code, same idempotency keys."""
    from fhir_service.database import database_url, start_database
    from subscriptions.analyzer import build_analyzer
    from subscriptions.pipeline import Pipeline
    from vector_store.migrate import migrate
    from vector_store.store import VectorStore

    start_database(settings)
    dsn = database_url(settings)
    migrate(dsn)
    pipeline = Pipeline(
        fhir=FhirClient(settings.fhir_base_url, timeout=120),
        analyzer=build_analyzer(settings),
        store=VectorStore(dsn),
        max_image_bytes=settings.max_image_bytes,
        image_hosts=frozenset(settings.image_hosts),
    )

    def process(study_id: str, version_id: str) -> str:
        return pipeline.process(study_id, version_id)

    return process


def _print_summary(r: IngestReport) -> None:
    table = Table(title=f"NIH ingest — {r.rows_read} rows in {r.wall_s:.1f} s")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("studies created", str(r.rows_created))
    table.add_row("studies already present", str(r.rows_already_present))
    table.add_row("rows done by an earlier run", str(r.rows_resumed))
    table.add_row("rows skipped", str(len(r.skipped)))
    table.add_row("rows failed", str(len(r.failed)))
    table.add_row("rows with images", str(r.rows_with_images))
    for kind, n in r.created.items():
        table.add_row(f"  {kind} created", str(n))
    for kind, n in r.already_present.items():
        table.add_row(f"  {kind} already present", str(n))
    for reason, n in r.skipped_by_reason.items():
        table.add_row(f"  skipped: {reason}", str(n))
    for outcome, n in r.inference.items():
        table.add_row(f"  inference: {outcome}", str(n))
    console.print(table)
    if r.wall_s:
        console.print(f"{r.resources_written / r.wall_s:.1f} resources/s")
    for bad in r.failed[:20]:
        console.print(f"[red]failed[/] line {bad.line} ({bad.image_index}): {bad.reason}")
