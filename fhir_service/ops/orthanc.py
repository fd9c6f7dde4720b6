"""Lifecycle of the embedded PACS: Debian's Orthanc with its DICOMweb plugin.

Like HAPI, Orthanc runs detached and is tracked by a pid file in the data dir
(:class:`~fhir_service.ops.procs.ManagedProcess`); its storage (SQLite index + DICOM files), its
generated ``orthanc.json`` and its log live under ``{data_dir}/orthanc``. It listens on
localhost only (``RemoteAccessAllowed`` false) with the DICOM network listener off: the service
reaches it over DICOMweb (QIDO-RS, WADO-RS, STOW-RS) at ``{url}/dicom-web``.

When ``CXR_DICOMWEB_URL`` names an external PACS nothing is started here.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cxr_errors import ConfigError
from fhir_service.ops.procs import ManagedProcess, ensure_port_free
from fhir_service.settings import Settings

__all__ = ["OrthancStatus", "config", "is_answering", "start", "status", "stop"]

log = logging.getLogger(__name__)

#: Debian's locations (packages ``orthanc`` and ``orthanc-dicomweb``; ``make pacs``).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _process(settings: Settings) -> ManagedProcess:
    return ManagedProcess("orthanc", settings.run_dir, settings.log_dir)


def config(settings: Settings) -> dict[str, Any]:
    """The ``orthanc.json`` we generate: storage in the data dir, localhost only, DICOMweb on;
    with ``CXR_DICOMWEB_USERNAME``/``PASSWORD`` set, HTTP basic auth for that one user (the
    worker and ``cxr ingest dicom`` send them; nothing else gets in)."""
    storage = str(settings.orthanc_dir.resolve() / "storage")
    users = _users(settings)
    return {
        "Name": "cxr-fhir embedded PACS",
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": settings.orthanc_http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        **({"RegisteredUsers": users} if users else {}),
        "OrthancExplorerEnabled": False,
        "DicomServerEnabled": False,
        "DicomPort": settings.orthanc_dicom_port,
        "HttpThreadsCount": 8,
        "ConcurrentJobs": 1,
        "KeepAlive": True,
        "OverwriteInstances": True,
        "StableAge": 5,
        "SaveJobs": False,
        "Plugins": [str(settings.orthanc_plugin)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "Host": f"127.0.0.1:{settings.orthanc_http_port}",
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }


def _users(settings: Settings) -> dict[str, str]:
    if settings.dicomweb_username is None:
        return {}
    if not settings.dicomweb_password:
        raise ConfigError(
            "CXR_DICOMWEB_USERNAME is set without CXR_DICOMWEB_PASSWORD: the embedded Orthanc "
            "needs both to enable basic auth"
        )
    return {settings.dicomweb_username: settings.dicomweb_password}


def is_answering(settings: Settings, *, timeout_s: float = 5.0) -> bool:
    """True when the embedded Orthanc answers ``/system`` and its DICOMweb plugin QIDO-RS."""
    base = f"http://127.0.0.1:{settings.orthanc_http_port}"
    auth = next(iter(_users(settings).items()), None)
    try:
        system = httpx.get(f"{base}/system", timeout=timeout_s, auth=auth)
        if system.status_code != 200 or "Version" not in system.json():
            return False
        qido = httpx.get(
            f"{base}/dicom-web/studies",
            params={"limit": "1"},
            headers={"Accept": "application/dicom+json"},
            timeout=timeout_s,
            auth=auth,
        )
    except (httpx.HTTPError, ValueError):
        return False
    return qido.status_code in (200, 204)


def _argv(settings: Settings, config_file: Path) -> list[str]:
    binary = settings.orthanc_binary
    if not binary.is_file():
        raise ConfigError(
            f"Orthanc is not installed ({binary} is missing): run `make pacs` "
            "(Debian packages orthanc and orthanc-dicomweb), or set CXR_DICOMWEB_URL to an "
            "external PACS"
        )
    if not settings.orthanc_plugin.is_file():
        raise ConfigError(
            f"the Orthanc DICOMweb plugin {settings.orthanc_plugin} is missing: run `make pacs`"
        )
    return [str(binary), str(config_file)]


def start(settings: Settings, *, progress: Callable[[str], None] | None = None) -> float:
    """Start the embedded Orthanc and wait until DICOMweb answers; seconds to ready, 0.0 when
    it was already running, or when an external PACS is configured (nothing to start)."""
    say = progress or log.info
    if not settings.embedded_pacs:
        say(f"using the external PACS at {settings.dicomweb_base_url}; nothing to start")
        return 0.0
    proc = _process(settings)
    pid = proc.pid()
    if pid is not None:
        if is_answering(settings):
            say(f"Orthanc is already running (pid {pid}) at {settings.dicomweb_base_url}")
            return 0.0
        return proc.wait_ready(lambda: is_answering(settings), timeout_s=60)
    ensure_port_free("127.0.0.1", settings.orthanc_http_port, "Orthanc", "CXR_ORTHANC_HTTP_PORT")
    settings.orthanc_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    config_file = settings.orthanc_dir / "orthanc.json"
    config_file.write_text(json.dumps(config(settings), indent=2))
    argv = _argv(settings, config_file)
    t0 = time.monotonic()
    pid = proc.start(argv, cwd=settings.orthanc_dir)
    say(f"started Orthanc (pid {pid}); waiting for {settings.dicomweb_base_url}")
    proc.wait_ready(lambda: is_answering(settings), timeout_s=60)
    return time.monotonic() - t0


def stop(settings: Settings) -> bool:
    """Stop our Orthanc; False if it was not running."""
    return _process(settings).stop(timeout_s=30.0)


def wipe(settings: Settings) -> None:
    """Remove the embedded PACS's storage (tests start from an empty archive)."""
    shutil.rmtree(settings.orthanc_dir, ignore_errors=True)


@dataclass(frozen=True)
class OrthancStatus:
    pid: int | None
    url: str
    answering: bool
    embedded: bool
    log_file: Path


def status(settings: Settings) -> OrthancStatus:
    proc = _process(settings)
    pid = proc.pid()
    return OrthancStatus(
        pid=pid,
        url=settings.dicomweb_base_url,
        answering=is_answering(settings, timeout_s=2.0) if pid is not None else False,
        embedded=settings.embedded_pacs,
        log_file=proc.log_file,
    )
