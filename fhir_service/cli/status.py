"""``cxr status``: every study's state, the failures by reason, and what is stuck."""

from __future__ import annotations

import json
from datetime import datetime

import typer
from rich.table import Table

from fhir_service.cli._common import cli_errors, console
from fhir_service.settings import get_settings
from subscriptions.census import Census

#: Exit code when any study is stuck (1 is a plain error, e.g. HAPI unreachable).
EXIT_STUCK = 3
_SHOWN = 50


def register(app: typer.Typer) -> None:
    app.command()(status)


def status(
    since: datetime | None = typer.Option(
        None, help="Only studies updated after this time (ISO 8601); default all."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Count the studies per state (reported, failed by reason, waiting for images, in flight)
    and list the ones stuck past the bound (CXR_STUCK_AFTER); exit 3 when any is stuck."""
    from fhir_service.worker import run_census

    settings = get_settings()
    with cli_errors():
        census = run_census(settings, since=since)
    if as_json:
        typer.echo(json.dumps(_as_dict(census), indent=2))
    else:
        _print(census, settings.stuck_after.total_seconds())
    if census.stuck or census.unserved:
        raise typer.Exit(EXIT_STUCK)


def _as_dict(census: Census) -> dict[str, object]:
    return {
        "studies": len(census.studies),
        "states": dict(census.counts),
        "failed_by_reason": dict(census.failed_by_reason),
        "live_workers": census.live_workers,
        "jobs_without_worker": census.unserved,
        "stuck": [
            {"study": f"ImagingStudy/{s.study_id}", "state": s.state.value, "why": s.stuck}
            for s in census.stuck
        ],
    }


def _print(census: Census, bound_s: float) -> None:
    table = Table(title=f"{len(census.studies)} ImagingStudies")
    table.add_column("state")
    table.add_column("studies", justify="right")
    for state, n in sorted(census.counts.items(), key=lambda kv: -kv[1]):
        table.add_row(state, str(n))
        if state == "failed":
            for reason, m in census.failed_by_reason.most_common():
                table.add_row(f"  {reason}", str(m))
    table.add_row("[bold]stuck[/]", f"[bold]{len(census.stuck)}[/]")
    console.print(table)
    console.print(f"live workers: {census.live_workers}")
    if census.unserved:
        console.print(f"[bold red]{census.unserved} jobs are queued and no worker is alive[/]")
    if not census.stuck:
        console.print(f"nothing stuck (bound {bound_s:.0f} s)")
        return
    stuck = Table(title=f"stuck past the bound ({bound_s:.0f} s)")
    stuck.add_column("study")
    stuck.add_column("state")
    stuck.add_column("why")
    for s in census.stuck[:_SHOWN]:
        stuck.add_row(f"ImagingStudy/{s.study_id}", s.state.value, s.stuck or "")
    console.print(stuck)
    if len(census.stuck) > _SHOWN:
        console.print(f"… and {len(census.stuck) - _SHOWN} more (--json lists all)")
