"""Fixtures of the integration tests. The real servers (``hapi``, ``stack``) are session
fixtures of ``tests/conftest.py``, shared with ``tests/security``; ``HapiServer`` is
re-exported here for the modules that import it from this place."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FHIR_JSON, HapiServer

__all__ = ["FHIR_JSON", "HapiServer"]


@pytest.fixture
def fhir(hapi: HapiServer) -> Iterator[httpx.Client]:
    """An httpx client on the FHIR base, speaking FHIR JSON."""
    with hapi.client() as client:
        yield client
