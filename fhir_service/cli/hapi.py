"""``cxr hapi``: build, start, stop and inspect the HAPI FHIR server (``hapi-fhir/``)."""

from __future__ import annotations

import typer

from fhir_service.cli._common import cli_errors, console
from fhir_service.ops import hapi_server
from fhir_service.settings import get_settings

app = typer.Typer(no_args_is_help=True)


def _say(message: str) -> None:
    console.print(f"[dim]{message}[/]")


@app.command()
def build(
    force: bool = typer.Option(False, "--force", "-f", help="Rebuild even if the jar is current."),
) -> None:
    """Build hapi-fhir/target/cxr-hapi-fhir.jar with Maven (skipped when up to date)."""
    settings = get_settings()
    with cli_errors():
        built = hapi_server.build_jar(settings, force=force, progress=_say)
    if not built:
        console.print(f"[green]up to date:[/] {settings.hapi_jar}")


@app.command()
def start() -> None:
    """Start HAPI in the background (building it first if needed) and wait until it answers."""
    settings = get_settings()
    with cli_errors():
        seconds = hapi_server.start(settings, progress=_say)
    if seconds > 0:
        console.print(f"[green]HAPI ready[/] at {settings.fhir_base_url} after {seconds:.1f} s")
    console.print(f"log: {settings.log_dir / 'hapi.log'}")


@app.command()
def stop() -> None:
    """Stop the HAPI process started by `cxr hapi start`."""
    settings = get_settings()
    with cli_errors():
        stopped = hapi_server.stop(settings)
    console.print("[green]HAPI stopped[/]" if stopped else "HAPI was not running")


@app.command()
def status() -> None:
    """Show whether HAPI runs, answers, and how much memory it holds."""
    settings = get_settings()
    with cli_errors():
        st = hapi_server.status(settings)
    if not st.running:
        console.print(f"HAPI is [yellow]not running[/] (expected at {st.url})")
        raise typer.Exit(1)
    rss = f"{st.rss_bytes / 2**20:.0f} MiB" if st.rss_bytes is not None else "?"
    answer = "[green]answering[/]" if st.answering else "[yellow]not answering[/]"
    console.print(f"HAPI pid {st.pid} {answer} at {st.url}; RSS {rss}; log {st.log_file}")
