"""The embedded PACS: its generated configuration, and a real start/stop of Debian's Orthanc
(the `pacs` fixture) with DICOMweb answering, state in the data dir, pid file removed on stop."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from cxr_errors import ConfigError
from fhir_service.dicom.web import DicomwebPacs
from fhir_service.ops import orthanc
from fhir_service.settings import Settings


def test_config_keeps_state_in_the_data_dir_and_listens_on_the_configured_port(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path, orthanc_http_port=19042, orthanc_dicom_port=19043)
    cfg = orthanc.config(settings)
    assert cfg["HttpPort"] == 19042
    assert cfg["DicomPort"] == 19043
    assert cfg["StorageDirectory"].startswith(str(tmp_path.resolve()))
    assert cfg["RemoteAccessAllowed"] is False
    assert cfg["DicomWeb"]["Enable"] is True
    assert settings.dicomweb_base_url == "http://127.0.0.1:19042/dicom-web"
    assert settings.embedded_pacs


def test_an_external_pacs_starts_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, dicomweb_url="https://pacs.example.org/dicom-web/")
    assert not settings.embedded_pacs
    assert settings.dicomweb_base_url == "https://pacs.example.org/dicom-web"
    assert orthanc.start(settings) == 0.0
    assert not (tmp_path / "orthanc").exists()


def test_a_missing_orthanc_says_how_to_install_it(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, orthanc_binary=tmp_path / "no-orthanc", orthanc_http_port=19044
    )
    with pytest.raises(ConfigError, match="make pacs"):
        orthanc.start(settings)


@pytest.mark.integration
def test_the_embedded_pacs_runs_from_the_data_dir(
    pacs: DicomwebPacs, test_settings: Settings
) -> None:
    st = orthanc.status(test_settings)
    assert st.pid is not None and st.answering
    assert (test_settings.orthanc_dir / "orthanc.json").is_file()
    assert (test_settings.run_dir / "orthanc.pid").is_file()
    plugins = httpx.get(f"http://127.0.0.1:{test_settings.orthanc_http_port}/plugins").json()
    assert "dicom-web" in plugins
    assert isinstance(pacs.study_uids(), list)  # QIDO-RS answers (a JSON array)
