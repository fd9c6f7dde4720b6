"""The real HAPI FHIR server for integration tests: one per test run, from a clean H2 database.

HAPI takes 20-40 s to boot on a small machine, so it is started once per session (port and
data dir come from ``test_settings`` in ``tests/conftest.py``, away from a demo stack) and
stopped at the end. Tests share it and keep their resources apart with unique identifiers.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from fhir_service.ops import hapi_server
from fhir_service.ops.stack import start_service, start_workers, stop_all
from fhir_service.settings import Settings
from tests.integration.stack import Stack

FHIR_JSON = "application/fhir+json"


def _fhir_content_type(request: httpx.Request) -> None:
    # httpx labels ``json=`` bodies application/json. HAPI reads that as FHIR for most types,
    # but a POST /Binary with it stores the JSON text itself as the binary content.
    if request.headers.get("content-type") == "application/json":
        request.headers["Content-Type"] = FHIR_JSON


@dataclass
class HapiServer:
    """Handle on the session's HAPI process."""

    settings: Settings
    boot_s: float

    @property
    def base_url(self) -> str:
        return self.settings.fhir_base_url

    def client(self, timeout_s: float = 60.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Accept": FHIR_JSON},
            timeout=timeout_s,
            event_hooks={"request": [_fhir_content_type]},
        )

    def restart(self) -> float:
        """Stop and start HAPI on the same data dir; returns seconds to ready."""
        hapi_server.stop(self.settings)
        self.boot_s = hapi_server.start(self.settings)
        return self.boot_s


@pytest.fixture(scope="session")
def hapi(test_settings: Settings) -> Iterator[HapiServer]:
    settings = test_settings
    # A HAPI left behind by an interrupted run would hold the port and the H2 file lock.
    hapi_server.stop(settings)
    shutil.rmtree(settings.hapi_dir, ignore_errors=True)
    (settings.log_dir / "hapi.log").unlink(missing_ok=True)
    try:
        boot_s = hapi_server.start(settings)
    except BaseException:
        hapi_server.stop(settings)  # a HAPI that did not get ready in time must not outlive the run
        raise
    server = HapiServer(settings=settings, boot_s=boot_s)
    try:
        yield server
    finally:
        hapi_server.stop(settings)


@pytest.fixture
def fhir(hapi: HapiServer) -> Iterator[httpx.Client]:
    """An httpx client on the FHIR base, speaking FHIR JSON."""
    with hapi.client() as client:
        yield client


@pytest.fixture(scope="session")
def stack(hapi: HapiServer, database: str, test_settings: Settings) -> Iterator[Stack]:
    """HAPI + PostgreSQL + one ``cxr serve`` + one ``cxr worker`` (untrained), per session."""
    stop_all(test_settings)
    try:
        start_service(test_settings)
        start_workers(test_settings, 1)
        s = Stack(test_settings, database)
    except BaseException:
        stop_all(test_settings)  # a half-started stack must not outlive the run
        raise
    try:
        yield s
    finally:
        stop_all(test_settings)
        s.fhir.close()
