"""Helpers the benchmark scripts share (``from bench._common import …``: each script puts the
repository on ``sys.path`` first). Not a benchmark itself: ``make bench`` skips ``_*.py``."""

from __future__ import annotations

import os
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
