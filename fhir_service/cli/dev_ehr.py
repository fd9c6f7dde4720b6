"""``cxr dev-ehr``: the development EHR launcher + SMART authorization server + FHIR proxy."""

from __future__ import annotations

import typer
from rich.panel import Panel

from cxr_errors import ConfigError
from fhir_service.cli._common import cli_errors, console
from fhir_service.settings import get_settings


def register(app: typer.Typer) -> None:
    app.command(name="dev-ehr")(dev_ehr)


def dev_ehr(
    host: str | None = typer.Option(None, help="Bind address (default CXR_DEV_EHR_HOST)."),
    port: int | None = typer.Option(None, help="Port (default CXR_DEV_EHR_PORT)."),
    patient: str | None = typer.Option(None, help="Print the EHR launch URL for this Patient id."),
) -> None:
    """DEVELOPMENT TOOL: an EHR launcher and SMART App Launch 2.x server for demos and tests.

    Serves /launch (an EHR launch link per patient, and a user-level worklist launch with
    no patient in context), SMART discovery at
    {url}/fhir/.well-known/smart-configuration, /auth/authorize, /auth/token, a JWKS, and a
    token-checked FHIR proxy in front of HAPI at {url}/fhir. Keys live in {data_dir}/dev-ehr.
    """
    import uvicorn

    from fhir_service.dev_ehr import create_app
    from fhir_service.dev_ehr.pages import BANNER

    settings = get_settings()
    if host is not None or port is not None:
        settings = settings.model_copy(
            update={
                "dev_ehr_host": host or settings.dev_ehr_host,
                "dev_ehr_port": port or settings.dev_ehr_port,
            }
        )
    with cli_errors():
        if settings.mode == "prod":
            raise ConfigError(
                "cxr dev-ehr is a development tool and refuses to run with CXR_MODE=prod; "
                "point the app at a real EHR instead"
            )
        app = create_app(settings)
    url = settings.dev_ehr_url
    launch = f"{url}/launch" + (f"/ehr?patient={patient}" if patient else "")
    console.print(
        Panel(
            f"[bold]{BANNER}[/]\n"
            "one built-in user, no login: never expose it beyond your machine\n\n"
            f"launch:     {launch}\n"
            f"FHIR base:  {settings.dev_ehr_fhir_url}  (in front of {settings.fhir_base_url})\n"
            f"discovery:  {settings.dev_ehr_fhir_url}/.well-known/smart-configuration\n"
            f"app launch: {settings.dev_ehr_launch_target}",
            title="cxr dev-ehr",
            border_style="bold red",
        )
    )
    uvicorn.run(
        app,
        host=settings.dev_ehr_host,
        port=settings.dev_ehr_port,
        log_level="info",
        access_log=False,
    )
