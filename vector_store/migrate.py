"""Schema of the vector store: versioned SQL migrations and HNSW index (re)builds.

Migrations are the files ``migrations/NNN_name.sql``, applied in version order and recorded
(with a checksum) in ``schema_migrations``. Every process that starts (``cxr serve``, each
``cxr worker``, tests) may call :func:`migrate`; a transaction-scoped advisory lock makes the
concurrent callers queue, and the one that gets it second finds nothing left to do. All pending
migrations run in one transaction, so a failure leaves the schema as it was (it also means a
migration cannot use ``CREATE INDEX CONCURRENTLY``; use :func:`build_hnsw_index` for that kind
of work).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from cxr_errors import InputError, StoreError

__all__ = [
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_M",
    "MIGRATIONS_DIR",
    "SPACES",
    "TABLE",
    "Migration",
    "Space",
    "SpaceSpec",
    "applied_migrations",
    "build_hnsw_index",
    "drop_hnsw_index",
    "hnsw_index_options",
    "load_migrations",
    "migrate",
]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
TABLE = "study_embeddings"

#: HNSW graph degree. m=24 bought no recall over 16 at 112k and cost latency (notes).
DEFAULT_M = 16
#: HNSW build beam. 128 instead of pgvector's 64: recall@10 at ef_search 100 goes from 0.975 to
#: 0.998 at 112k for ~35% more build time, the cheapest recall there is (notes, bench/similar.py).
DEFAULT_EF_CONSTRUCTION = 128

#: Arbitrary, fixed key of the advisory lock that serialises migrations (one per database).
_MIGRATION_LOCK_KEY = 0x63_78_72_5F_76_73_01  # "cxr_vs" + 1

Space = Literal["clip", "densenet"]


@dataclass(frozen=True)
class SpaceSpec:
    """One embedding space: its column, dimensionality and HNSW index."""

    name: Space
    column: str
    dimensions: int
    index: str


SPACES: dict[Space, SpaceSpec] = {
    "clip": SpaceSpec("clip", "clip_embedding", 512, "study_embeddings_clip_hnsw"),
    "densenet": SpaceSpec("densenet", "densenet_features", 1024, "study_embeddings_densenet_hnsw"),
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


_FILE_RE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in ``directory``, in version order; refuses gaps and duplicates."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match is None:
            raise StoreError(f"migration file {path.name!r} is not named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise StoreError(f"two migrations have version {version:03d} in {directory}")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise StoreError(f"migration versions must be 1..n without gaps, found {versions}")
    return [found[v] for v in versions]


@contextmanager
def _connection(conninfo: str | psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """A connection from a DSN (opened and closed here) or the caller's own (left open)."""
    if isinstance(conninfo, psycopg.Connection):
        yield conninfo
        return
    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to the vector store database: {exc}") from exc
    with conn:
        yield conn


def _ensure_migrations_table(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    integer     PRIMARY KEY,
            name       text        NOT NULL,
            checksum   text        NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def applied_migrations(conninfo: str | psycopg.Connection[Any]) -> dict[int, str]:
    """Version -> checksum of the migrations recorded in the database ({} if none)."""
    with _connection(conninfo) as conn, conn.transaction():
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return {}
        rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    return {int(v): str(c) for v, c in rows}


def migrate(
    conninfo: str | psycopg.Connection[Any], *, directory: Path = MIGRATIONS_DIR
) -> list[int]:
    """Apply the pending migrations; returns the versions applied by this call (often [])."""
    migrations = load_migrations(directory)
    try:
        with _connection(conninfo) as conn, conn.transaction():
            # Taken before anything else, including creating schema_migrations: two first
            # starts would otherwise race on CREATE TABLE and one of them would fail.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            _ensure_migrations_table(conn)
            applied = {
                int(v): str(c)
                for v, c in conn.execute("SELECT version, checksum FROM schema_migrations")
            }
            known = {m.version for m in migrations}
            for migration in migrations:
                recorded = applied.get(migration.version)
                if recorded is not None and recorded != migration.checksum:
                    raise StoreError(
                        f"migration {migration.version:03d}_{migration.name} was edited after "
                        "it was applied; add a new migration instead"
                    )
            newer = sorted(set(applied) - known)
            if newer:
                # A newer release migrated this database (rolling upgrade): run, don't touch it.
                log.warning("database has migrations %s unknown to this release", newer)
            done: list[int] = []
            for migration in migrations:
                if migration.version in applied:
                    continue
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
                done.append(migration.version)
    except psycopg.Error as exc:
        raise StoreError(f"vector store migration failed: {exc}") from exc
    if done:
        log.info("applied vector store migrations %s", done)
    return done


def _spec(space: str) -> SpaceSpec:
    try:
        return SPACES[space]  # type: ignore[index]
    except KeyError:
        raise InputError(f"unknown space {space!r}; expected one of {sorted(SPACES)}") from None


def drop_hnsw_index(conninfo: str | psycopg.Connection[Any], space: Space) -> None:
    """Drop a space's HNSW index, e.g. before a bulk backfill (inserting into a graph row by
    row is far slower than building it once afterwards with :func:`build_hnsw_index`)."""
    spec = _spec(space)
    try:
        with _connection(conninfo) as conn, conn.transaction():
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(spec.index)))
    except psycopg.Error as exc:
        raise StoreError(f"cannot drop index {spec.index}: {exc}") from exc


def build_hnsw_index(
    conninfo: str | psycopg.Connection[Any],
    space: Space,
    *,
    m: int = DEFAULT_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    maintenance_work_mem: str | None = None,
    parallel_workers: int | None = None,
) -> float:
    """(Re)build a space's cosine HNSW index with the given parameters; returns seconds taken.

    Drop and create run in one transaction, so searches block (rather than silently fall back
    to an exact scan) while the index builds. ``maintenance_work_mem`` must hold the whole
    graph (~1.3x the index size; '2GB' for 1M x 512 halfvec) or pgvector switches to a much
    slower on-disk build. ``parallel_workers`` sets max_parallel_maintenance_workers (1 on a
    2-core machine: 25 s instead of 41 s at 112k in the notes). Finishes with ANALYZE so the
    planner sees the rows a bulk load just added.
    """
    spec = _spec(space)
    if not 2 <= m <= 100:
        raise InputError(f"HNSW m must be in 2..100, got {m}")
    if not 4 <= ef_construction <= 1000 or ef_construction < 2 * m:
        raise InputError(f"HNSW ef_construction must be in 2*m..1000, got {ef_construction}")
    if parallel_workers is not None and not 0 <= parallel_workers <= 64:
        raise InputError(f"parallel_workers must be in 0..64, got {parallel_workers}")
    t0 = time.monotonic()
    try:
        with _connection(conninfo) as conn, conn.transaction():
            if maintenance_work_mem is not None:
                conn.execute(
                    "SELECT set_config('maintenance_work_mem', %s, true)", (maintenance_work_mem,)
                )
            if parallel_workers is not None:
                conn.execute(
                    "SELECT set_config('max_parallel_maintenance_workers', %s, true)",
                    (str(parallel_workers),),
                )
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(spec.index)))
            # Storage parameters cannot be bind parameters; both are validated ints above.
            conn.execute(
                sql.SQL(
                    "CREATE INDEX {index} ON {table} USING hnsw ({column} halfvec_cosine_ops) "
                    "WITH (m = {m}, ef_construction = {efc})"
                ).format(
                    index=sql.Identifier(spec.index),
                    table=sql.Identifier(TABLE),
                    column=sql.Identifier(spec.column),
                    m=sql.Literal(m),
                    efc=sql.Literal(ef_construction),
                )
            )
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(TABLE)))
    except psycopg.Error as exc:
        raise StoreError(f"cannot build index {spec.index}: {exc}") from exc
    seconds = time.monotonic() - t0
    log.info(
        "built %s (m=%d, ef_construction=%d) in %.1f s", spec.index, m, ef_construction, seconds
    )
    return seconds


def hnsw_index_options(conninfo: str | psycopg.Connection[Any], space: Space) -> dict[str, int]:
    """The storage options (m, ef_construction) of a space's HNSW index; {} if it is absent."""
    spec = _spec(space)
    with _connection(conninfo) as conn, conn.transaction():
        row = conn.execute(
            "SELECT reloptions FROM pg_class WHERE relname = %s AND relkind = 'i'",
            (spec.index,),
        ).fetchone()
    if row is None:
        return {}
    options = row[0] or []
    return {k: int(v) for k, v in (opt.split("=", 1) for opt in options)}
