"""``cxr hapi``: build, start, stop and inspect the HAPI FHIR server. (Being written.)"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
