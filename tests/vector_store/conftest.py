"""A private database per test module on the session's PostgreSQL server.

The session database is shared with other packages' integration tests (the pipeline writes
embeddings there); these tests need empty tables and may drop indexes, so each module gets its
own database, dropped and recreated when the module starts (with ``CXR_DATABASE_URL``, that
server's user needs CREATEDB).
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from vector_store.server import ensure_vector_extension


@pytest.fixture(scope="module")
def fresh_database(database: str) -> Callable[[str], str]:
    """``fresh_database(name)`` -> URL of a new, empty database with pgvector on that server."""

    def make(name: str) -> str:
        with psycopg.connect(make_conninfo(database, dbname="postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = make_conninfo(database, dbname=name)
        ensure_vector_extension(url)
        return url

    return make
