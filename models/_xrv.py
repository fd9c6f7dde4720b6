"""The one place that imports torchxrayvision.

``import torchxrayvision`` calls ``warnings.filterwarnings("ignore")`` at module
level, which silences every warning in the process (and would hide real
problems from pytest's warnings-as-errors). Everything in ``models`` imports
``xrv`` from here; ``catch_warnings`` restores the caller's filters on exit.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    import torchxrayvision as xrv

__all__ = ["xrv"]
