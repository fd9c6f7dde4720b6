"""The security suite runs against the same real stack as the integration tests (HAPI,
PostgreSQL, ``cxr serve``, one worker: the session fixtures of ``tests/conftest.py``), plus a
``cxr dev-ehr`` of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from fhir_service.ops.stack import dev_ehr_process, start_dev_ehr, stop_dev_ehr
from fhir_service.settings import Settings
from tests.dev_ehr.smart_client import SmartClient


@pytest.fixture(scope="session")
def security_ehr_settings(test_settings: Settings) -> Settings:
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    return test_settings.model_copy(
        update={
            "data_dir": test_settings.data_dir / "dev-ehr-security",
            "dev_ehr_port": 18008 + offset,
        }
    )


@pytest.fixture(scope="session")
def dev_ehr(security_ehr_settings: Settings, stack: object) -> Iterator[Settings]:
    """A dev EHR in front of the session's HAPI (the stack must be up first)."""
    settings = security_ehr_settings
    stop_dev_ehr(settings)
    dev_ehr_process(settings).log_file.unlink(missing_ok=True)
    start_dev_ehr(settings)
    try:
        yield settings
    finally:
        stop_dev_ehr(settings)


@pytest.fixture
def smart(dev_ehr: Settings) -> Iterator[SmartClient]:
    with httpx.Client(base_url=dev_ehr.dev_ehr_url, timeout=60) as http:
        yield SmartClient(
            http, iss=dev_ehr.dev_ehr_fhir_url, redirect_uri=f"{dev_ehr.service_url}/app/callback"
        )
