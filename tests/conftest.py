"""Fixtures shared by every test: settings for the test run, the real PostgreSQL server, and
synthetic inference results for the FHIR builder tests (see :mod:`tests.factories`).

Integration state lives in one data dir (default ``.cxr-data/test``, or ``CXR_TEST_DATA_DIR``)
that is wiped when the session starts, so every run begins clean and a demo stack in
``.cxr-data`` is never touched. Ports are offset from the demo's for the same reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_service.dicom.web import DicomwebPacs
from fhir_service.ops import hapi_server, orthanc
from fhir_service.ops.stack import start_service, start_workers, stop_all
from fhir_service.settings import Settings, TrustedIssuer
from models.types import ImageAnalysis
from tests.factories import make_analysis, make_study
from tests.integration.stack import Stack

REPO = Path(__file__).resolve().parent.parent
#: Ports (before the offset) of the dev EHRs integration tests start: test_dev_ehr (18002),
#: test_app_browser (18004, 18005), test_app_patient_context (18006), test_similar (18007),
#: tests/security (18008).
DEV_EHR_PORTS = (18002, 18004, 18005, 18006, 18007, 18008)


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    # Tests read the environment only for where to keep this run's state and which ports.
    path = Path(os.environ.get("CXR_TEST_DATA_DIR", REPO / ".cxr-data" / "test"))
    return path


@pytest.fixture(scope="session")
def test_settings(test_data_dir: Path) -> Settings:
    # CXR_TEST_PORT_OFFSET lets two checkouts (or a benchmark) run tests side by side.
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    return Settings(
        data_dir=test_data_dir,
        hapi_port=18080 + offset,
        pg_port=15433 + offset,
        service_port=18001 + offset,
        orthanc_http_port=18042 + offset,
        orthanc_dicom_port=14242 + offset,
        model_weights="untrained",
        clip_weights="untrained",
        # The dev EHRs the integration tests start (each module its own port).
        app_issuers=[f"http://127.0.0.1:{port + offset}/fhir" for port in DEV_EHR_PORTS],
        # $similar (reached through their FHIR proxies and HAPI) accepts their tokens.
        similar_issuers=[
            TrustedIssuer(
                issuer=f"http://127.0.0.1:{port + offset}",
                audience=f"http://127.0.0.1:{port + offset}/fhir",
            )
            for port in DEV_EHR_PORTS
        ],
        # Long enough to see a study wait for its image, short enough to see the wait end.
        image_wait=timedelta(seconds=30),
        # The stuck sweep then runs every minute (tests/integration/test_status.py).
        stuck_after=timedelta(seconds=60),
    )


@pytest.fixture(scope="session")
def shared_dir(test_settings: Settings) -> Path:
    path = test_settings.shared_dir
    if not (path / "data" / "nih-sample" / "manifest.csv").exists():
        pytest.fail(f"shared test data not found under {path} (set CXR_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def database(test_settings: Settings) -> Iterator[str]:
    """A real PostgreSQL with pgvector for this run; yields its URL.

    Uses ``CXR_DATABASE_URL`` when set (an external server), else the embedded one in a
    clean directory under the test data dir, stopped at the end.
    """
    from fhir_service.ops.database import start_database, stop_database

    if test_settings.database_url is None:
        shutil.rmtree(test_settings.pg_dir, ignore_errors=True)
    info = start_database(test_settings)
    yield info.url
    stop_database(test_settings)


@pytest.fixture
def analysis() -> ImageAnalysis:
    return make_analysis()


@pytest.fixture
def untrained_analysis() -> ImageAnalysis:
    return make_analysis(untrained=True)


@pytest.fixture
def study() -> dict[str, Any]:
    return make_study()


# --- the real servers (shared by tests/integration and tests/security) -------------------------
# HAPI takes 20-40 s to boot on a small machine, so it is started once per session and stopped
# at the end; tests share it and keep their resources apart with unique identifiers.

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


@pytest.fixture(scope="session")
def pacs(test_settings: Settings) -> Iterator[DicomwebPacs]:
    """The embedded PACS (Debian's Orthanc + DICOMweb plugin) on an empty archive, per session."""
    settings = test_settings
    orthanc.stop(settings)  # one left behind by an interrupted run
    orthanc.wipe(settings)
    (settings.log_dir / "orthanc.log").unlink(missing_ok=True)
    try:
        orthanc.start(settings)
    except BaseException:
        orthanc.stop(settings)
        raise
    try:
        yield DicomwebPacs(settings.dicomweb_base_url)
    finally:
        orthanc.stop(settings)


@pytest.fixture(scope="session")
def stack(
    hapi: HapiServer, database: str, pacs: DicomwebPacs, test_settings: Settings
) -> Iterator[Stack]:
    """HAPI + PostgreSQL + the embedded PACS + one ``cxr serve`` + one ``cxr worker``
    (untrained), per session."""
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
