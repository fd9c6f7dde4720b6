"""``cxr db``: the embedded PostgreSQL + pgvector server."""

from __future__ import annotations

import typer

from fhir_service.cli._common import cli_errors, console
from fhir_service.ops.database import database_url, embedded, start_database, stop_database
from fhir_service.settings import get_settings

app = typer.Typer(no_args_is_help=True)


@app.command()
def start() -> None:
    """Start PostgreSQL (embedded unless CXR_DATABASE_URL is set) and enable pgvector."""
    with cli_errors():
        info = start_database(get_settings())
    where = "embedded" if info.embedded else "external (CXR_DATABASE_URL)"
    console.print(f"PostgreSQL {where} ready at [bold]{info.url}[/] (pgvector {info.pgvector})")


@app.command()
def stop() -> None:
    """Stop the embedded PostgreSQL server."""
    with cli_errors():
        stopped = stop_database(get_settings())
    console.print("PostgreSQL stopped" if stopped else "PostgreSQL was not running (or external)")


@app.command()
def status() -> None:
    """Say whether the database answers."""
    settings = get_settings()
    if settings.database_url is None:
        up = embedded(settings).running()
    else:
        import psycopg

        try:
            with psycopg.connect(settings.database_url, connect_timeout=3):
                up = True
        except psycopg.OperationalError:
            up = False
    console.print(f"{database_url(settings)}: {'[green]up[/]' if up else '[red]down[/]'}")
    if not up:
        raise typer.Exit(1)
