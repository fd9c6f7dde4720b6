"""Helpers the benchmark scripts share (``from bench._common import …``: each script puts the
repository on ``sys.path`` first). Not a benchmark itself: ``make bench`` skips ``_*.py``."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load() -> str:
    """The load averages and CPU count, printed beside every figure measured."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, every_s: float = 0.05) -> Any:
    """Poll ``probe`` until it returns something truthy (returned); exit naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def stack_settings(
    data_dir: Path, *, hapi_port: int, pg_port: int, service_port: int, **extra: Any
) -> Any:
    """Settings for a benchmark's own stack: its data dir and ports, untrained models, and
    nothing from the environment that would point it at another server (an external
    database, a public URL), so the figures are of the embedded stack it starts."""
    from fhir_service.settings import Settings

    return Settings(
        data_dir=data_dir,
        hapi_port=hapi_port,
        pg_port=pg_port,
        service_port=service_port,
        model_weights="untrained",
        clip_weights="untrained",
        database_url=None,
        hapi_base_url=None,
        service_public_url=None,
        **extra,
    )


def add_stack_arguments(
    parser: argparse.ArgumentParser,
    data_dir: Path,
    *,
    hapi_port: int,
    pg_port: int,
    service_port: int,
    keep_help: str = "leave the stack running at the end",
) -> None:
    """``--data-dir``, the stack's ports and ``--keep``: each benchmark has its own defaults,
    so that two benchmarks (or a benchmark and the tests) never share a server."""
    parser.add_argument("--data-dir", type=Path, default=data_dir)
    parser.add_argument("--hapi-port", type=int, default=hapi_port)
    parser.add_argument("--pg-port", type=int, default=pg_port)
    parser.add_argument("--service-port", type=int, default=service_port)
    parser.add_argument("--keep", action="store_true", help=keep_help)


def wipe_stack_state(settings: Any) -> None:
    """Fresh HAPI and PostgreSQL state, logs and pid files; ``{data_dir}/models`` (exported
    ONNX graphs) is kept."""
    for sub in (settings.hapi_dir, settings.pg_dir, settings.log_dir, settings.run_dir):
        shutil.rmtree(sub, ignore_errors=True)
