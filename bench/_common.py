"""Helpers the benchmark scripts share (imported as ``_common``: each script runs with
``bench/`` first on ``sys.path``). Not a benchmark itself: ``make bench`` skips ``_*.py``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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
