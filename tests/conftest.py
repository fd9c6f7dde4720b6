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
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fhir_service.settings import Settings
from models.types import ImageAnalysis
from tests.factories import make_analysis, make_study

REPO = Path(__file__).resolve().parent.parent


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
        model_weights="untrained",
        clip_weights="untrained",
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
