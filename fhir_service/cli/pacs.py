"""``cxr pacs``: start, stop and inspect the embedded PACS (Debian's Orthanc + DICOMweb)."""

from __future__ import annotations

import typer

from fhir_service.cli._common import cli_errors, console
from fhir_service.ops import orthanc
from fhir_service.settings import get_settings

app = typer.Typer(no_args_is_help=True)


def _say(message: str) -> None:
    console.print(f"[dim]{message}[/]")


@app.command()
def start() -> None:
    """Start the embedded Orthanc in the background and wait until DICOMweb answers."""
    settings = get_settings()
    with cli_errors():
        seconds = orthanc.start(settings, progress=_say)
    if seconds > 0:
        console.print(f"[green]PACS ready[/] at {settings.dicomweb_base_url} after {seconds:.1f} s")
    console.print(f"log: {settings.log_dir / 'orthanc.log'}")


@app.command()
def stop() -> None:
    """Stop the Orthanc started by `cxr pacs start`."""
    settings = get_settings()
    with cli_errors():
        stopped = orthanc.stop(settings)
    console.print("[green]PACS stopped[/]" if stopped else "PACS was not running")


@app.command()
def status() -> None:
    """Show whether the embedded PACS runs and answers DICOMweb."""
    settings = get_settings()
    with cli_errors():
        st = orthanc.status(settings)
    if not st.embedded:
        console.print(f"external PACS at {st.url} (CXR_DICOMWEB_URL); nothing embedded runs")
        return
    if st.pid is None:
        console.print(f"PACS is [yellow]not running[/] (expected at {st.url})")
        raise typer.Exit(1)
    answer = "[green]answering[/]" if st.answering else "[yellow]not answering[/]"
    console.print(f"Orthanc pid {st.pid} {answer} at {st.url}; log {st.log_file}")
