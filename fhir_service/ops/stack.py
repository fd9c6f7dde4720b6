"""Start and stop ``cxr serve`` and ``cxr worker`` as background processes (demo, tests, bench)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from fhir_service.ops.procs import ManagedProcess, ensure_port_free
from fhir_service.settings import Settings

_CXR = [sys.executable, "-m", "fhir_service.cli"]


def service_process(settings: Settings) -> ManagedProcess:
    return ManagedProcess("service", settings.run_dir, settings.log_dir)


def worker_process(settings: Settings, index: int = 0) -> ManagedProcess:
    return ManagedProcess(f"worker-{index}", settings.run_dir, settings.log_dir)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as CXR_* variables, so a child process sees exactly this configuration."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, list):
            import json

            env[f"CXR_{name.upper()}"] = json.dumps(value)
        else:
            env[f"CXR_{name.upper()}"] = str(value)
    return env


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def start_service(settings: Settings, *, timeout_s: float = 120) -> float:
    proc = service_process(settings)
    if proc.pid() is not None and _healthy(f"{settings.service_url}/healthz"):
        return 0.0
    ensure_port_free(settings.service_host, settings.service_port, "cxr serve", "CXR_SERVICE_PORT")
    proc.start([*_CXR, "serve"], env=settings_env(settings), cwd=Path.cwd())
    return proc.wait_ready(lambda: _healthy(f"{settings.service_url}/healthz"), timeout_s=timeout_s)


def start_workers(settings: Settings, count: int = 1) -> list[int]:
    pids = []
    for i in range(count):
        proc = worker_process(settings, i)
        pid = proc.pid()
        if pid is None:
            pid = proc.start([*_CXR, "worker"], env=settings_env(settings), cwd=Path.cwd())
        pids.append(pid)
    return pids


def stop_all(settings: Settings) -> list[str]:
    stopped = []
    for path in sorted(settings.run_dir.glob("worker-*.pid")):
        proc = ManagedProcess(path.stem, settings.run_dir, settings.log_dir)
        if proc.stop():
            stopped.append(proc.name)
    if service_process(settings).stop():
        stopped.append("service")
    if dev_ehr_process(settings).stop():
        stopped.append("dev-ehr")
    return stopped


def dev_ehr_process(settings: Settings) -> ManagedProcess:
    return ManagedProcess("dev-ehr", settings.run_dir, settings.log_dir)


def start_dev_ehr(settings: Settings, *, timeout_s: float = 60) -> float:
    """Start ``cxr dev-ehr`` (the development SMART launcher/authorization server)."""
    proc = dev_ehr_process(settings)
    probe = f"{settings.dev_ehr_fhir_url}/.well-known/smart-configuration"
    if proc.pid() is not None and _healthy(probe):
        return 0.0
    ensure_port_free(settings.dev_ehr_host, settings.dev_ehr_port, "dev-ehr", "CXR_DEV_EHR_PORT")
    proc.start([*_CXR, "dev-ehr"], env=settings_env(settings), cwd=Path.cwd())
    return proc.wait_ready(lambda: _healthy(probe), timeout_s=timeout_s)


def stop_dev_ehr(settings: Settings) -> bool:
    return dev_ehr_process(settings).stop()
