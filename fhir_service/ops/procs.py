"""Background processes owned by cxr: started detached, tracked by a pid file, stopped by pid.

HAPI, ``cxr serve`` and ``cxr worker`` are all managed this way so that ``make demo``
can leave a stack running and ``cxr ... stop`` can end exactly what it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from cxr_errors import ServiceError

log = logging.getLogger(__name__)

#: Children started by this process. They are meant to outlive the Popen object (they are
#: tracked by pid file), but a Popen garbage-collected while its child runs warns; keeping it
#: here also lets ``stop`` reap the child instead of leaving a zombie.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def port_in_use(host: str, port: int) -> bool:
    """Whether something already accepts connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def ensure_port_free(host: str, port: int, what: str, setting: str) -> None:
    """Refuse to start ``what`` on a port another process holds.

    Otherwise the new process dies at bind, while the readiness probe is answered by the
    stranger (another checkout's server, a stale one whose pid file is gone), and everything
    after talks to the wrong server.
    """
    if port_in_use(host, port):
        raise ServiceError(
            f"port {host}:{port} for {what} is already in use by a process cxr did not start "
            f"from this data dir; stop it or set {setting}"
        )


@dataclass(frozen=True)
class ManagedProcess:
    """A named background process with its pid file and log file under the data dir."""

    name: str
    run_dir: Path
    log_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of the running process, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                return pid
        except psutil.NoSuchProcess:
            pass
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait(timeout=10)  # reap our own dead child
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> int:
        """Start ``argv`` detached, logging to the log file; returns its pid."""
        existing = self.pid()
        if existing is not None:
            raise ServiceError(f"{self.name} is already running (pid {existing})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        self.pid_file.write_text(str(proc.pid))
        log.info("started %s pid=%s log=%s", self.name, proc.pid, self.log_file)
        return proc.pid

    def wait_ready(
        self, probe: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.5
    ) -> float:
        """Poll ``probe`` until true; returns seconds waited. Fails fast if the process died."""
        t0 = time.monotonic()
        while True:
            if probe():
                return time.monotonic() - t0
            if self.pid() is None:
                raise ServiceError(
                    f"{self.name} exited during start-up; see {self.log_file}:\n{self.tail()}"
                )
            if time.monotonic() - t0 > timeout_s:
                raise ServiceError(
                    f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_file}:\n"
                    f"{self.tail()}"
                )
            time.sleep(interval_s)

    def stop(self, *, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> bool:
        """Stop the process (and its process group); returns False if it was not running."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)
        try:
            psutil.Process(pid).wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing", self.name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            psutil.Process(pid).wait(timeout=10)
        except psutil.NoSuchProcess:
            pass
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)
        return True

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
