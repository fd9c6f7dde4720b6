"""``cxr demo``: the whole stack on embedded defaults, shown working; ``cxr demo stop`` ends it."""

from __future__ import annotations

import typer
from rich.table import Table

from fhir_service import hapi_server
from fhir_service.cli._common import cli_errors, console
from fhir_service.database import start_database, stop_database
from fhir_service.fhir_client import FhirClient
from fhir_service.nih import (
    imaging_study_resource,
    patient_conditional,
    patient_resource,
    read_manifest,
    study_conditional,
)
from fhir_service.settings import Settings, get_settings

app = typer.Typer(invoke_without_command=True)

DEMO_STUDIES = 5


@app.callback()
def demo(ctx: typer.Context) -> None:
    """Start PostgreSQL and HAPI, post real NIH studies, show them; leaves the stack running."""
    if ctx.invoked_subcommand is not None:
        return
    settings = get_settings()
    with cli_errors():
        _run(settings)


@app.command()
def stop() -> None:
    """Stop everything the demo started."""
    settings = get_settings()
    with cli_errors():
        console.print("HAPI stopped" if hapi_server.stop(settings) else "HAPI was not running")
        console.print("PostgreSQL stopped" if stop_database(settings) else "PostgreSQL not running")


def _run(settings: Settings) -> None:
    console.rule("cxr-fhir demo")
    db = start_database(settings)
    console.print(f"PostgreSQL + pgvector {db.pgvector}: {db.url}")
    console.print("Starting HAPI FHIR (first run builds hapi-fhir/ with Maven) ...")
    took = hapi_server.start(settings)
    console.print(f"HAPI FHIR ready at {settings.fhir_base_url} ({took:.1f} s)")

    manifest = settings.shared_dir / "data" / "nih-sample" / "manifest.csv"
    records = list(read_manifest(manifest))[:DEMO_STUDIES]
    table = Table(title="NIH studies in HAPI (read back)")
    for col in ("image", "Patient", "ImagingStudy", "sex", "age", "view", "NIH labels"):
        table.add_column(col)
    with FhirClient(settings.fhir_base_url) as fhir:
        for rec in records:
            patient = fhir.create(patient_resource(rec), if_none_exist=patient_conditional(rec))
            pref = f"Patient/{patient['id']}"
            study = fhir.create(
                imaging_study_resource(rec, pref), if_none_exist=study_conditional(rec)
            )
            back = fhir.read("ImagingStudy", study["id"])
            assert back["subject"]["reference"] == pref
            table.add_row(
                rec.image_index,
                pref,
                f"ImagingStudy/{back['id']}",
                rec.sex,
                str(rec.age_years),
                rec.view_position,
                ", ".join(rec.finding_labels) or "No Finding",
            )
    console.print(table)
    console.print(f"FHIR base:   {settings.fhir_base_url}")
    console.print(f"PostgreSQL:  {db.url}")
    console.print(f"Logs:        {settings.log_dir}")
    console.print("Stop with:   [bold]make stop[/]  (or: .venv/bin/cxr demo stop)")
