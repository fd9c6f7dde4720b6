"""Shared CLI presentation helpers: one console, errors shown as one clear line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from rich.console import Console

from cxr_errors import CxrError

console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn a ``CxrError`` into a red message and exit code 1 (no traceback for known errors)."""
    try:
        yield
    except CxrError as exc:
        err_console.print(f"[bold red]error:[/] {exc.message}")
        raise typer.Exit(1) from exc


def run_cli(fn: Callable[[], T]) -> T:
    with cli_errors():
        return fn()
