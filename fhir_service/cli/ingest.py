"""``cxr ingest nih``: bulk-load NIH ChestX-ray14 (metadata, any subset of images) into FHIR."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

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

from cxr_errors import InputError
from fhir_service.cli._common import cli_errors, console
from fhir_service.fhir.client import FhirClient
from fhir_service.ingest import IngestOptions, IngestReport, ingest
from fhir_service.ingest import Progress as IngestProgress
from fhir_service.settings import Settings, get_settings

if TYPE_CHECKING:
    from subscriptions.pipeline import Pipeline

app = typer.Typer(no_args_is_help=True)


# The options of `cxr ingest nih`.
_METADATA = typer.Option(
    None,
    "--metadata",
    help="Data_Entry_2017*.csv(.gz) or a sample manifest.csv "
    "(default: the copy inside the installed torchxrayvision).",
)
_IMAGES = typer.Option(
    None, "--images", help="Folder with (any subset of) the NIH PNGs, searched recursively."
)
_LIMIT = typer.Option(None, "--limit", min=1, help="Only the first N rows.")
_CONCURRENCY = typer.Option(
    None,
    "--concurrency",
    min=1,
    help="Transactions in flight (default CXR_INGEST_CONCURRENCY).",
)
_BATCH_SIZE = typer.Option(
    None, "--batch-size", min=1, help="Studies per transaction (default CXR_INGEST_BATCH_SIZE)."
)
_BBOX = typer.Option(
    None,
    "--bbox",
    help="NIH's BBox_List_2017.csv(.gz): boxes go on their studies "
    "(default: the copy inside the installed torchxrayvision).",
)
_NO_BBOX = typer.Option(False, "--no-bbox", help="Load no bounding boxes.")
_BULK_INFERENCE = typer.Option(
    False,
    "--bulk-inference",
    help="Run the model here on the studies with images, several images per batched "
    "pass, instead of waiting for the worker (same pipeline, same idempotent results).",
)
_INFERENCE_BATCH_SIZE = typer.Option(
    None,
    "--inference-batch-size",
    min=1,
    help="Images per model pass with --bulk-inference (default CXR_INGEST_INFERENCE_BATCH_SIZE).",
)
_REPORT = typer.Option(None, "--report", help="Write the machine-readable report (JSON) here.")
_RESTART = typer.Option(
    False, "--restart", help="Ignore the progress of an earlier run of the same file."
)


@app.command()
def nih(
    metadata: Path | None = _METADATA,
    images: Path | None = _IMAGES,
    limit: int | None = _LIMIT,
    concurrency: int | None = _CONCURRENCY,
    batch_size: int | None = _BATCH_SIZE,
    bbox: Path | None = _BBOX,
    no_bbox: bool = _NO_BBOX,
    bulk_inference: bool = _BULK_INFERENCE,
    inference_batch_size: int | None = _INFERENCE_BATCH_SIZE,
    report: Path | None = _REPORT,
    restart: bool = _RESTART,
) -> None:
    """Load NIH ChestX-ray14: one Patient per patient, one ImagingStudy (+ Media) per image."""
    from fhir_service.ingest import nih as nih_meta

    settings = get_settings()
    with cli_errors():
        if bbox is not None and no_bbox:
            raise InputError("--bbox and --no-bbox exclude each other")
        if images is not None and not images.is_dir():
            raise InputError(f"--images {images} is not a directory")
        options = IngestOptions(
            metadata=metadata or nih_meta.default_metadata_path(),
            state_dir=settings.ingest_state_dir or settings.data_dir / "ingest",
            images=images,
            limit=limit,
            batch_size=batch_size or settings.ingest_batch_size,
            concurrency=concurrency or settings.ingest_concurrency,
            resume=not restart,
            max_image_bytes=settings.max_image_bytes,
            bbox=None if no_bbox else bbox or nih_meta.default_bbox_path(),
            inference_batch_size=inference_batch_size or settings.ingest_inference_batch_size,
        )
        result = _ingest_with_progress(settings, options, bulk_inference=bulk_inference)
    _print_summary(result)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.as_json(), indent=2) + "\n")
        console.print(f"report written to {report}")
    if result.failed:
        raise typer.Exit(1)


def _ingest_with_progress(
    settings: Settings, options: IngestOptions, *, bulk_inference: bool
) -> IngestReport:
    console.print(f"ingesting [bold]{options.metadata}[/] into {settings.fhir_base_url}")
    with ExitStack() as stack:
        process = (
            stack.enter_context(bulk_pipeline(settings)).process_batch if bulk_inference else None
        )
        # A generous timeout: a 200-study transaction on a busy H2 can take tens of seconds.
        fhir = stack.enter_context(FhirClient(settings.fhir_base_url, timeout=300))
        bar = stack.enter_context(_progress_bar())
        task = bar.add_task("rows", total=None, rate="")
        t0 = time.monotonic()

        def on_progress(p: IngestProgress) -> None:
            # Rate over the whole run: batches finish in bursts, a short window jitters.
            elapsed = max(time.monotonic() - t0, 1e-6)
            rate = f"{p.rows_done / elapsed:.0f} rows/s, {p.resources_written / elapsed:.0f} res/s"
            bar.update(task, total=p.rows_total, completed=p.rows_done, rate=rate)

        return ingest(fhir, options, progress=on_progress, process_studies=process)


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@contextmanager
def bulk_pipeline(settings: Settings) -> Iterator[Pipeline]:
    """The worker's own pipeline, in this process: same code, same idempotency keys. Its
    ``process_batch`` takes several studies and runs the model once over all their images."""
    from fhir_service.ops.database import database_url, start_database
    from fhir_service.runtime import build_analyzer, build_pipeline
    from vector_store.migrate import migrate
    from vector_store.store import VectorStore

    start_database(settings)
    dsn = database_url(settings)
    migrate(dsn)
    analyzer = build_analyzer(settings)
    with FhirClient(settings.fhir_base_url, timeout=120) as fhir:
        store = VectorStore(dsn)
        pipeline = build_pipeline(settings, fhir, analyzer, store)
        try:
            yield pipeline
        finally:
            store.close()


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
    if r.conflicts_retried:
        table.add_row("writes retried after a concurrent writer won", str(r.conflicts_retried))
    if r.bbox is not None:
        table.add_row("box lines read", str(r.boxes_read))
        table.add_row("  boxes written", str(r.boxes_written))
        table.add_row("  boxes already present", str(r.boxes_already_present))
        table.add_row("  existing studies given their boxes", str(r.studies_boxes_updated))
        for reason, n in r.boxes_skipped_by_reason.items():
            table.add_row(f"  boxes not attached: {reason}", str(n))
    console.print(table)
    if r.wall_s:
        console.print(f"{r.resources_written / r.wall_s:.1f} resources/s")
    for bad in r.failed[:20]:
        console.print(f"[red]failed[/] line {bad.line} ({bad.image_index}): {bad.reason}")
    # Boxes of images that are not among this run's rows are expected with --limit or a
    # partial metadata file: counted above, listed in --report. Anything else is shown.
    odd = [b for b in r.boxes_skipped if "metadata rows read" not in b.reason]
    odd = [b for b in odd if "not in the metadata" not in b.reason]
    for box in odd[:20]:
        console.print(
            f"[yellow]box not attached[/] {r.bbox} line {box.line} ({box.image_index}): "
            f"{box.reason}"
        )


@app.command()
def dicom(
    paths: list[Path] = typer.Argument(..., help="DICOM files, or directories to walk."),
) -> None:
    """STOW DICOM files to the PACS and register their studies in FHIR (idempotent by Study
    Instance UID): Patient, ServiceRequest (accession number), Endpoint, ImagingStudy."""
    from fhir_service.ingest.dicom_files import ingest_dicom
    from fhir_service.runtime import build_pacs

    settings = get_settings()
    with cli_errors(), FhirClient(settings.fhir_base_url, timeout=120) as fhir:
        report = ingest_dicom(paths, fhir, build_pacs(settings), max_bytes=settings.max_image_bytes)
    for s in report.studies:
        console.print(f"{s.outcome:9} {s.imaging_study}  study {s.study_uid} ({s.files} files)")
    for path, why in report.skipped:
        console.print(f"[yellow]skipped[/] {path}: {why}")
    if not report.studies:
        console.print("[red]no DICOM study found[/]")
        raise typer.Exit(2)
