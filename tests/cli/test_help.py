"""`cxr --help` and every subcommand's `--help` exit 0 (walked from the real CLI tree)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from fhir_service.cli import app


def _paths(cmd: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    # typer may ship its own click; duck-type groups rather than isinstance(click.Group).
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _paths(sub, (*prefix, name))


ALL = list(_paths(get_command(app)))


def test_cli_tree_is_not_empty() -> None:
    assert len(ALL) > 5


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "cxr")
def test_help_exits_zero(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_console_script_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from fhir_service.cli import main; main()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "hapi" in out.stdout
