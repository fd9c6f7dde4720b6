"""Which PostgreSQL to use: ``CXR_DATABASE_URL`` if set, else the embedded one in the data dir."""

from __future__ import annotations

from dataclasses import dataclass

from fhir_service.settings import Settings
from vector_store.server import EmbeddedPostgres, ensure_database, ensure_vector_extension

#: Our database on the embedded server (HAPI, when it uses PostgreSQL, gets its own).
EMBEDDED_DBNAME = "cxr"


def embedded(settings: Settings) -> EmbeddedPostgres:
    return EmbeddedPostgres(settings.pg_dir, settings.pg_port)


def database_url(settings: Settings) -> str:
    return settings.database_url or embedded(settings).dsn(EMBEDDED_DBNAME)


@dataclass(frozen=True)
class DatabaseInfo:
    url: str
    embedded: bool
    pgvector: str
    started_s: float


def start_database(settings: Settings) -> DatabaseInfo:
    """Make the database usable: start the embedded server if needed, create db + extension."""
    started = 0.0
    if settings.database_url is None:
        server = embedded(settings)
        started = server.start()
        ensure_database(server.admin_dsn(), EMBEDDED_DBNAME)
    url = database_url(settings)
    version = ensure_vector_extension(url)
    return DatabaseInfo(url, settings.database_url is None, version, started)


def stop_database(settings: Settings) -> bool:
    """Stop the embedded server; an external ``CXR_DATABASE_URL`` server is never touched."""
    if settings.database_url is not None:
        return False
    return embedded(settings).stop()
