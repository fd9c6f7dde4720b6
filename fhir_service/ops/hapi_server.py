"""Lifecycle of the HAPI FHIR server built from ``hapi-fhir/``: build the jar, start, stop, inspect.

The server is a detached ``java -jar`` process tracked by a pid file in the data dir
(:class:`~fhir_service.ops.procs.ManagedProcess`), so ``cxr hapi start`` can return and a later
``cxr hapi stop`` ends exactly that process. Its H2 database and log live in the data dir.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from cxr_errors import ConfigError, ServiceError
from fhir_service.ops.procs import ManagedProcess, ensure_port_free
from fhir_service.settings import Settings

__all__ = [
    "HapiStatus",
    "build_jar",
    "is_answering",
    "jar_is_stale",
    "start",
    "status",
    "stop",
]

log = logging.getLogger(__name__)

#: JVM options besides the heap. Serial GC: on a 2-core box a concurrent collector's threads
#: and remembered sets cost more memory than they save in pauses for a sub-1 GB heap.
#: The JIT is left at its default (C1, then C2 for hot code). C1 alone (TieredStopAtLevel=1)
#: boots a little sooner but runs HAPI's request validation at about half the speed: in
#: paired bench/pipeline.py runs the worker's result transaction took 1,002 ms per study with
#: C1 alone against 455 ms with C2 (issue 17; README). ExitOnOutOfMemoryError: a HAPI that
#: ran out of heap should die (and be seen dead by ``status``) rather than keep answering some
#: requests and failing others.
JVM_OPTIONS: tuple[str, ...] = (
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Dfile.encoding=UTF-8",
)

_BUILD_INPUTS = ("pom.xml", "src")


def _process(settings: Settings) -> ManagedProcess:
    return ManagedProcess("hapi", settings.run_dir, settings.log_dir)


def _module_dir(settings: Settings) -> Path | None:
    """The Maven module that produces ``settings.hapi_jar``; None for a prebuilt jar elsewhere."""
    module = settings.hapi_jar.parent.parent
    return module if (module / "pom.xml").is_file() else None


def _newest_input_mtime(module: Path) -> float:
    newest = 0.0
    for name in _BUILD_INPUTS:
        path = module / name
        if path.is_file():
            newest = max(newest, path.stat().st_mtime)
        elif path.is_dir():
            for f in path.rglob("*"):
                if f.is_file():
                    newest = max(newest, f.stat().st_mtime)
    return newest


def jar_is_stale(settings: Settings) -> bool:
    """True when the jar is missing or older than any source file or the pom."""
    jar = settings.hapi_jar
    if not jar.is_file():
        return True
    module = _module_dir(settings)
    if module is None:
        return False
    return jar.stat().st_mtime < _newest_input_mtime(module)


def build_jar(
    settings: Settings,
    force: bool = False,
    *,
    progress: Callable[[str], None] | None = None,
) -> bool:
    """Build ``hapi-fhir/target/cxr-hapi-fhir.jar`` with Maven if it is missing or stale.

    Returns True when a build ran. ``progress`` receives one-line human messages (the CLI
    prints them); by default they are logged.
    """
    say = progress or log.info
    if not force and not jar_is_stale(settings):
        return False
    module = _module_dir(settings)
    if module is None:
        raise ConfigError(
            f"HAPI jar {settings.hapi_jar} is missing and there is no Maven module next to it"
        )
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ConfigError("Maven (mvn) is not on PATH; it is needed to build the HAPI server")
    argv = [mvn, "-q", "-B", "-f", str(module / "pom.xml"), "-DskipTests", "package"]
    say(
        f"building the HAPI FHIR server ({' '.join(argv[1:])}); "
        "the first build downloads ~350 MB of dependencies into ~/.m2"
    )
    t0 = time.monotonic()
    result = subprocess.run(
        argv,
        cwd=module,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not settings.hapi_jar.is_file():
        tail = "\n".join(result.stdout.splitlines()[-40:])
        raise ServiceError(
            f"Maven build of the HAPI server failed (exit {result.returncode}):\n{tail}"
        )
    # Maven leaves the jar alone when only non-compiled inputs changed; mark it current so
    # the next start does not rebuild again.
    settings.hapi_jar.touch()
    say(f"built {settings.hapi_jar} in {time.monotonic() - t0:.1f} s")
    return True


def is_answering(settings: Settings, *, timeout_s: float = 5.0) -> bool:
    """True when ``GET {base}/metadata`` returns an R4 CapabilityStatement."""
    try:
        resp = httpx.get(
            f"{settings.fhir_base_url}/metadata",
            headers={"Accept": "application/fhir+json"},
            timeout=timeout_s,
        )
        if resp.status_code != 200:
            return False
        body = resp.json()
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(body, dict) and body.get("resourceType") == "CapabilityStatement"


def _jdbc_url(settings: Settings) -> str:
    if settings.hapi_jdbc_url:
        return settings.hapi_jdbc_url
    # An absolute path: H2 resolves relative ones against the JVM's working directory.
    # DB_CLOSE_ON_EXIT=FALSE: otherwise H2's own shutdown hook closes the database while
    # HAPI's schedulers are still running, and every stop logs "Database is already closed".
    path = (settings.hapi_dir / "h2" / "hapi").resolve()
    return f"jdbc:h2:file:{path};DB_CLOSE_ON_EXIT=FALSE"


def _java_argv(settings: Settings) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise ConfigError("java is not on PATH; the HAPI server needs Java 17 or newer")
    return [
        java,
        f"-Xmx{settings.hapi_heap}",
        *JVM_OPTIONS,
        "-jar",
        str(settings.hapi_jar),
        f"--server.address={settings.hapi_host}",
        f"--server.port={settings.hapi_port}",
        f"--spring.datasource.url={_jdbc_url(settings)}",
        f"--cxr.subscription-interval-ms={settings.hapi_subscription_interval_ms}",
        f"--cxr.cors-origins={settings.cors_origins}",
        f"--cxr.similar-service-url={settings.service_url}",
    ]


def _java_env(settings: Settings) -> dict[str, str]:
    # Credentials go through the environment (Spring's relaxed binding), not argv, which
    # any local user can read with ps.
    if not settings.hapi_jdbc_url:
        return {}
    return {
        "SPRING_DATASOURCE_USERNAME": settings.hapi_jdbc_user,
        "SPRING_DATASOURCE_PASSWORD": settings.hapi_jdbc_password,
    }


def start(settings: Settings, *, progress: Callable[[str], None] | None = None) -> float:
    """Start HAPI (building it first if needed) and wait until it answers.

    Returns the seconds from launch to the first CapabilityStatement; 0.0 when our HAPI was
    already running and answering.
    """
    say = progress or log.info
    proc = _process(settings)
    pid = proc.pid()
    if pid is not None:
        if is_answering(settings):
            say(f"HAPI is already running (pid {pid}) at {settings.fhir_base_url}")
            return 0.0
        say(f"HAPI (pid {pid}) is running but not answering yet; waiting")
        return proc.wait_ready(
            lambda: is_answering(settings), timeout_s=settings.hapi_start_timeout_s
        )
    ensure_port_free(settings.hapi_host, settings.hapi_port, "HAPI", "CXR_HAPI_PORT")
    build_jar(settings, progress=say)
    settings.hapi_dir.mkdir(parents=True, exist_ok=True)
    argv = _java_argv(settings)
    t0 = time.monotonic()
    pid = proc.start(argv, env=_java_env(settings), cwd=settings.hapi_dir)
    say(f"started HAPI (pid {pid}); waiting for {settings.fhir_base_url}/metadata")
    proc.wait_ready(lambda: is_answering(settings), timeout_s=settings.hapi_start_timeout_s)
    return time.monotonic() - t0


def stop(settings: Settings) -> bool:
    """Stop our HAPI process; False if it was not running."""
    return _process(settings).stop(timeout_s=30.0)


@dataclass(frozen=True)
class HapiStatus:
    """What ``cxr hapi status`` reports."""

    pid: int | None
    url: str
    answering: bool
    rss_bytes: int | None
    log_file: Path

    @property
    def running(self) -> bool:
        return self.pid is not None


def status(settings: Settings) -> HapiStatus:
    proc = _process(settings)
    pid = proc.pid()
    rss: int | None = None
    if pid is not None:
        try:
            rss = int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            rss = None
    return HapiStatus(
        pid=pid,
        url=settings.fhir_base_url,
        answering=is_answering(settings, timeout_s=2.0) if pid is not None else False,
        rss_bytes=rss,
        log_file=proc.log_file,
    )
