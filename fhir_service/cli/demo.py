"""``cxr demo``: the whole stack on embedded defaults, shown working; ``cxr demo stop`` ends it.

Starts PostgreSQL, HAPI, the embedded PACS (Orthanc), ``cxr serve`` and one ``cxr worker``;
runs five real NIH studies (the PNGs wrapped as DICOM) and the real DICOM files of
``shared/data/dicom`` through PACS → FHIR → inference → PACS (``cxr ingest dicom``: STOW,
then Patient + ImagingStudy with its Endpoint; the worker reads them over WADO-RS and STOWs
its SR and heatmaps back); waits for the reports;
prints a triage table and the FHIR URLs; starts ``cxr dev-ehr`` and prints a SMART launch
URL for the app; leaves the stack running.
"""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.panel import Panel
from rich.table import Table

from cxr_errors import ConfigError, CxrError
from fhir_service.cli._common import cli_errors, console
from fhir_service.fhir import identifiers, terminology
from fhir_service.fhir.client import FhirClient
from fhir_service.ingest.demo_dicom import demo_dicom_files
from fhir_service.ingest.dicom_files import ingest_dicom
from fhir_service.ingest.nih import read_manifest
from fhir_service.ops import hapi_server, orthanc
from fhir_service.ops.database import start_database, stop_database
from fhir_service.ops.stack import start_dev_ehr, start_service, start_workers, stop_all
from fhir_service.runtime import build_clip, build_pacs, model_version_for
from fhir_service.settings import Settings, get_settings

app = typer.Typer(invoke_without_command=True)

DEMO_STUDIES = 5
REPORT_TIMEOUT_S = 300.0
#: Triage order: the findings that cannot wait come first.
CRITICAL = ("Pneumothorax", "Effusion", "Pneumonia", "Edema", "Consolidation", "Mass")


@app.callback()
def demo(ctx: typer.Context) -> None:
    """Start the stack, post five real NIH studies, print the triage; leaves it running."""
    if ctx.invoked_subcommand is not None:
        return
    with cli_errors():
        _run(get_settings())


@app.command()
def stop() -> None:
    """Stop everything the demo started (service, workers, dev EHR, HAPI, PostgreSQL)."""
    settings = get_settings()
    with cli_errors():
        for name in stop_all(settings):
            console.print(f"{name} stopped")
        console.print("HAPI stopped" if hapi_server.stop(settings) else "HAPI was not running")
        console.print("PACS stopped" if orthanc.stop(settings) else "PACS was not running")
        console.print("PostgreSQL stopped" if stop_database(settings) else "PostgreSQL not running")


def _with_available_models(settings: Settings) -> Settings:
    """The settings to run with: untrained — loudly — where pretrained weights cannot be had."""
    missing: list[str] = []
    update: dict[str, Any] = {}
    try:
        model_version_for(settings)
    except ConfigError as exc:
        missing.append(f"DenseNet weights: {exc.message}")
        update = {"model_weights": "untrained", "clip_weights": "untrained"}
    if not update and settings.clip_weights != "untrained":
        try:
            build_clip(settings)
        except ConfigError as exc:
            missing.append(f"CLIP weights: {exc.message}")
            update["clip_weights"] = "untrained"
    if not missing:
        return settings
    console.print(
        Panel(
            "[bold]PRETRAINED WEIGHTS ARE NOT AVAILABLE ON THIS MACHINE.[/]\n"
            "The demo continues in [bold]UNTRAINED[/] mode: every score below is produced by a "
            "randomly initialised model and is [bold]NOT A FINDING[/]. Reports, Observations "
            "and the Device say 'untrained'.\n\n"
            + "\n".join(missing)
            + "\n\nProvide weights (CXR_MODEL_WEIGHTS=/path/to/file, CXR_WEIGHTS_CACHE_DIR, "
            "CXR_CLIP_WEIGHTS) to see real output.",
            title="UNTRAINED MODEL",
            style="bold red",
        )
    )
    return settings.model_copy(update=update)


def _run(base_settings: Settings) -> None:
    console.rule("cxr-fhir demo")
    settings = _with_available_models(base_settings)
    db = start_database(settings)
    console.print(f"PostgreSQL + pgvector {db.pgvector}: {db.url}")
    console.print("Starting HAPI FHIR (the first run builds hapi-fhir/ with Maven) ...")
    took = hapi_server.start(settings, progress=console.print)
    console.print(f"HAPI FHIR ready at {settings.fhir_base_url} ({took:.1f} s)")
    took = orthanc.start(settings, progress=console.print)
    console.print(f"PACS (DICOMweb) ready at {settings.dicomweb_base_url} ({took:.1f} s)")
    start_service(settings)
    console.print(f"cxr serve ready at {settings.service_url} (rest-hook Subscription active)")
    start_workers(settings, 1)
    console.print("cxr worker started (loads the models, then takes jobs)")

    model_version = model_version_for(settings)
    with FhirClient(settings.fhir_base_url, timeout=120) as fhir:
        studies = _ingest_demo_studies(settings, fhir)
        reports = _wait_for_reports(fhir, list(studies), model_version)
        rows = [_triage_row(fhir, sid, studies[sid], reports[sid]) for sid in studies]
        patient = fhir.read("ImagingStudy", rows[0]["study"])["subject"]["reference"]
    _print_triage(rows, settings, model_version)
    start_dev_ehr(settings)
    launch = f"{settings.dev_ehr_url}/launch/ehr?patient={patient.split('/')[-1]}"
    console.print(
        f"Open the SMART app: [bold]{launch}[/]\n"
        f"  (launched from `cxr dev-ehr`, a DEVELOPMENT EHR + authorization server at "
        f"{settings.dev_ehr_url}; all launches: {settings.dev_ehr_url}/launch)"
    )
    console.print("Stop with:        [bold]make stop[/]  (or: .venv/bin/cxr demo stop)")


def _ingest_demo_studies(settings: Settings, fhir: FhirClient) -> dict[str, str]:
    """STOW the demo's DICOM (NIH PNGs wrapped, and shared/data/dicom) and register them."""
    manifest = settings.shared_dir / "data" / "nih-sample" / "manifest.csv"
    files = demo_dicom_files(settings, list(read_manifest(manifest))[:DEMO_STUDIES])
    report = ingest_dicom(files, fhir, build_pacs(settings), max_bytes=settings.max_image_bytes)
    studies: dict[str, str] = {}
    for s in report.studies:
        sid = s.imaging_study.split("/")[1]
        studies[sid] = f"study {s.study_uid[-20:]}"
        console.print(f"PACS → FHIR: {s.imaging_study} {s.outcome} ({s.files} DICOM files)")
    for path, why in report.skipped:
        console.print(f"[yellow]skipped[/] {path}: {why}")
    return studies


def _wait_for_reports(
    fhir: FhirClient, study_ids: list[str], model_version: str
) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    with console.status("waiting for the worker's reports ...") as status:
        while len(found) < len(study_ids):
            for sid in study_ids:
                if sid in found:
                    continue
                system, value = identifiers.study_model_identifier(sid, model_version)
                hits = fhir.search("DiagnosticReport", {"identifier": f"{system}|{value}"})
                if hits.get("entry"):
                    found[sid] = hits["entry"][0]["resource"]
                else:
                    task = _failed_task(fhir, sid)
                    if task is not None:
                        raise CxrError(f"ImagingStudy/{sid} failed: {task}")
            status.update(f"waiting for the worker's reports ... {len(found)}/{len(study_ids)}")
            if len(found) < len(study_ids):
                if time.monotonic() > deadline:
                    raise CxrError(
                        f"only {len(found)} of {len(study_ids)} reports after "
                        f"{REPORT_TIMEOUT_S:.0f} s; see the worker log in the data dir"
                    )
                time.sleep(1)
    return found


def _failed_task(fhir: FhirClient, study_id: str) -> str | None:
    system, value = identifiers.task_identifier(study_id)
    for task in fhir.search_all("Task", {"identifier": f"{system}|{value}", "status": "failed"}):
        return str(task.get("statusReason", {}).get("text", "failed"))
    return None


def _triage_row(
    fhir: FhirClient, study_id: str, image: str, report: dict[str, Any]
) -> dict[str, Any]:
    findings = []
    for obs in fhir.search_all("Observation", {"derived-from": f"ImagingStudy/{study_id}"}):
        if obs.get("status") == "cancelled":
            continue
        nih = terminology.TERMINOLOGY.code_system_url("nih_label")
        label = next(
            (c["code"] for c in obs["code"]["coding"] if c["system"] == nih),
            obs["code"].get("text", "?"),
        )
        p = float(obs["valueQuantity"]["value"])
        band = next((e["valueRange"] for e in obs.get("extension", []) if "valueRange" in e), None)
        positive = obs["interpretation"][0]["coding"][0]["code"] == "POS"
        findings.append((label, p, band, positive))
    findings.sort(key=lambda f: -f[1])
    urgency = max((p for label, p, _, pos in findings if label in CRITICAL and pos), default=0.0)
    return {
        "study": study_id,
        "image": image,
        "report": report["id"],
        "urgency": urgency,
        "findings": findings,
    }


def _print_triage(rows: list[dict[str, Any]], settings: Settings, model_version: str) -> None:
    rows.sort(key=lambda r: -r["urgency"])
    untrained = "untrained" in model_version
    # An untrained model's numbers must not read as findings, not even in a column header.
    title = "UNTRAINED — NOT FINDINGS" if untrained else "Triage"
    table = Table(title=f"{title} (model {model_version})")
    # The value is a probability only where a calibration was fitted (its interpretation text
    # says which); the band is whichever the Observation carries (95 % band or TTA spread).
    scores = "highest untrained scores" if untrained else "top findings"
    for col in ("ImagingStudy", "source", f"{scores}: score [band, where computed]"):
        table.add_column(col)
    for row in rows:
        top = []
        for label, p, band, positive in row["findings"][:3]:
            rng = f" [{band['low']['value']:.2f}–{band['high']['value']:.2f}]" if band else ""
            flag = (" ≥ threshold" if untrained else " POS") if positive else ""
            top.append(f"{label} {p:.2f}{rng}{flag}")
        table.add_row(f"ImagingStudy/{row['study']}", row["image"], "; ".join(top))
    console.print(table)
    if untrained:
        console.print("[bold red]UNTRAINED MODEL — these numbers are not findings.[/]")
    base = settings.fhir_base_url
    first = rows[0]
    console.print(f"FHIR base:        {base}")
    console.print(f"A report:         {base}/DiagnosticReport/{first['report']}")
    console.print(
        f"Its results:      {base}/DiagnosticReport?_id={first['report']}"
        "&_include=DiagnosticReport:result&_include=DiagnosticReport:media"
    )
    console.print(
        f"Similar cases:    {base}/ImagingStudy/{first['study']}/$similar?count=5 "
        "(Authorization: Bearer $CXR_SERVICE_API_KEY, or `cxr similar "
        f"{first['study']}`)"
    )
    console.print(f"Service health:   {settings.service_url}/healthz")
    console.print(f"Logs:             {settings.log_dir}")
