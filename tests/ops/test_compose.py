"""docker-compose.yml cannot run here (no Docker engine); keep it consistent with the code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fhir_service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def test_compose_has_the_five_services_and_their_files() -> None:
    services = _compose()["services"]
    assert set(services) == {"hapi", "postgres", "orthanc", "service", "worker"}
    assert services["postgres"]["image"].startswith("pgvector/pgvector")
    for name in ("hapi", "orthanc", "service", "worker"):
        build = services[name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).is_file(), name
    for volume in services["postgres"]["volumes"]:
        src = volume.split(":")[0]
        if src.startswith("./"):
            assert (REPO / src).is_file(), src


def test_compose_environment_names_real_settings() -> None:
    fields = {f"CXR_{name.upper()}" for name in Settings.model_fields}
    for name in ("service", "worker"):
        env = _compose()["services"][name]["environment"]
        unknown = {key for key in env if key.startswith("CXR_")} - fields
        assert not unknown, f"{name} sets variables Settings does not read: {unknown}"


def test_compose_service_commands_are_cli_commands() -> None:
    from typer.main import get_command

    from fhir_service.cli import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name in ("service", "worker"):
        cmd = _compose()["services"][name]["command"]
        assert cmd[0] == "cxr"
        assert cmd[1] in commands, f"compose runs 'cxr {cmd[1]}', which the CLI lacks"
