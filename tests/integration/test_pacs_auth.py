"""A PACS that wants credentials: the embedded Orthanc with basic auth (CXR_DICOMWEB_USERNAME /
PASSWORD), reached through the same DicomwebPacs the worker and ``cxr ingest dicom`` use.

A second Orthanc of its own (own port and data dir), so the session's open PACS is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cxr_errors import ConfigError, PacsError
from fhir_service.ops import orthanc
from fhir_service.runtime import build_pacs
from fhir_service.settings import Settings
from tests.dicom.helpers import nih_png, wrapped

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not orthanc.DICOMWEB_PLUGIN.exists(), reason="needs make pacs"),
]

USER, PASSWORD = "cxr-worker", "s3cret-pacs"


@pytest.fixture(scope="module")
def guarded(test_settings: Settings, test_data_dir: Path) -> Iterator[Settings]:
    offset = int(os.environ.get("CXR_TEST_PORT_OFFSET", "0"))
    settings = test_settings.model_copy(
        update={
            "data_dir": test_data_dir / "pacs-auth",
            "orthanc_http_port": 18043 + offset,
            "dicomweb_username": USER,
            "dicomweb_password": PASSWORD,
        }
    )
    orthanc.stop(settings)
    orthanc.wipe(settings)
    try:
        orthanc.start(settings)
        yield settings
    finally:
        orthanc.stop(settings)


def test_the_configured_credentials_store_and_read_back(guarded: Settings) -> None:
    ds = wrapped(nih_png(guarded.shared_dir, 0), tag="auth")
    pacs = build_pacs(guarded)
    pacs.store([ds])
    headers = pacs.study_instances(ds.StudyInstanceUID)
    assert [h.SOPInstanceUID for h in headers] == [ds.SOPInstanceUID]
    data = pacs.instance(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, max_bytes=10**8
    )
    assert data[128:132] == b"DICM"


@pytest.mark.parametrize("password", [None, "wrong"], ids=["none", "wrong-password"])
def test_no_or_wrong_credentials_are_refused_with_the_settings_to_check(
    guarded: Settings, password: str | None
) -> None:
    settings = guarded.model_copy(
        update={
            "dicomweb_username": None if password is None else USER,
            "dicomweb_password": password,
        }
    )
    pacs = build_pacs(settings)
    with pytest.raises(PacsError, match=r"refused .*\(401\).*CXR_DICOMWEB_USERNAME"):
        pacs.study_instances("1.2.3.4")
    # Nor does the REST API let anyone in.
    assert httpx.get(f"http://127.0.0.1:{guarded.orthanc_http_port}/system").status_code == 401


def test_a_user_without_a_password_is_a_configuration_error(guarded: Settings) -> None:
    settings = guarded.model_copy(update={"dicomweb_password": None})
    with pytest.raises(ConfigError, match="without CXR_DICOMWEB_PASSWORD"):
        orthanc.config(settings)
