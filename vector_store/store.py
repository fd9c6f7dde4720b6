"""Study embeddings in PostgreSQL + pgvector: idempotent upsert and filtered k-NN search.

The store gets a DSN or a ``psycopg_pool.ConnectionPool`` and knows nothing of torch or FHIR.
Vectors are stored L2-normalised as ``halfvec`` (see ``migrations/001_study_embeddings.sql``);
scores are cosine similarities clipped to [0, 1].

Search runs in its own transaction with ``SET LOCAL``-scoped settings (``set_config(...,
true)``), so a pooled connection never carries one request's ``ef_search`` or exact mode into
the next.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, LiteralString

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from cxr_errors import InputError, StoreError
from vector_store.migrate import (
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_M,
    SPACES,
    TABLE,
    Space,
    build_hnsw_index,
)
from vector_store.records import (
    DEFAULT_EF_SEARCH,
    EF_SEARCH_RANGE,
    EmbeddingRecord,
    Hit,
    SearchFilters,
    Vector,
    check_text,
    checked_space,
    score_of,
    validate_query,
)

__all__ = ["DEFAULT_EF_CONSTRUCTION", "DEFAULT_M", "VectorStore", "indexed_studies", "search_sql"]

log = logging.getLogger(__name__)

#: A bulk upsert at least this large refreshes the planner statistics.
_ANALYZE_AFTER_ROWS = 1_000


_COLUMNS = (
    "study_id",
    "model_version",
    "study_version_id",
    "patient_id",
    "gender",
    "age",
    "view_position",
    "positive_findings",
    "image_sha256",
    "clip_version",
    "clip_embedding",
    "densenet_features",
)
_COPY_TYPES = [
    "text",
    "text",
    "text",
    "text",
    "text",
    "int4",
    "text",
    "text[]",
    "text",
    "text",
    "halfvec",
    "halfvec",
]
_KEY = ("study_id", "model_version")


def _upsert_sql(source: sql.Composable) -> sql.Composed:
    """INSERT ... ON CONFLICT DO UPDATE from ``source`` (VALUES or a SELECT)."""
    updates = sql.SQL(", ").join(
        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in _COLUMNS if c not in _KEY
    )
    return sql.SQL(
        "INSERT INTO {table} ({columns}) {source} "
        "ON CONFLICT (study_id, model_version) DO UPDATE SET {updates}, updated_at = now()"
    ).format(
        table=sql.Identifier(TABLE),
        columns=sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
        source=source,
        updates=updates,
    )


def _half(vector: Vector | None) -> HalfVector | None:
    return None if vector is None else HalfVector(vector)


def _row(record: EmbeddingRecord) -> tuple[Any, ...]:
    return (
        record.study_id,
        record.model_version,
        record.study_version_id,
        record.patient_id,
        record.gender,
        record.age,
        record.view_position,
        list(record.positive_findings),
        record.image_sha256,
        record.clip_version,
        _half(record.clip),
        _half(record.densenet),
    )


#: SearchFilters field → the clause it adds; the parameter has the field's name.
_FILTER_CLAUSES: tuple[tuple[str, LiteralString], ...] = (
    ("exclude_patient", "patient_id IS DISTINCT FROM %(exclude_patient)s"),
    ("patient", "patient_id = %(patient)s"),
    ("exclude_study", "study_id <> %(exclude_study)s"),
    ("gender", "gender = %(gender)s"),
    ("view_position", "view_position = %(view_position)s"),
    ("age_min", "age >= %(age_min)s"),
    ("age_max", "age <= %(age_max)s"),
    # @> rather than = ANY(...) so the GIN index on positive_findings can serve it.
    ("finding", "positive_findings @> ARRAY[%(finding)s]::text[]"),
)


def _filter_sql(filters: SearchFilters) -> tuple[list[sql.Composable], dict[str, Any]]:
    clauses: list[sql.Composable] = []
    params: dict[str, Any] = {}
    for field_name, clause in _FILTER_CLAUSES:
        value = getattr(filters, field_name)
        if value is not None:
            clauses.append(sql.SQL(clause))
            params[field_name] = value
    return clauses, params


def search_sql(
    space: Space, filters: SearchFilters, *, clip_version: str | None = None
) -> tuple[sql.Composed, dict[str, Any]]:
    """The k-NN statement and its parameters, less ``query``, ``model_version`` and ``k``.

    With ``hnsw.iterative_scan = relaxed_order`` the index keeps scanning until ``k`` rows pass
    the filters, but may return them slightly out of order; the MATERIALIZED CTE fixes the
    candidate set and the outer ORDER BY sorts it exactly (``distance + 0`` stops PostgreSQL 17+
    from assuming the CTE is already sorted, as pgvector's README advises). Ties break on
    study_id so that results are deterministic.
    """
    column = sql.Identifier(SPACES[space].column)
    clauses, params = _filter_sql(filters)
    if space == "clip" and clip_version is not None:
        # One CLIP version per comparison: vectors of two CLIP models share no space.
        clauses.append(sql.SQL("clip_version = %(clip_version)s"))
        params["clip_version"] = clip_version
    where = sql.SQL(" AND ").join(
        [
            sql.SQL("model_version = %(model_version)s"),
            sql.SQL("{} IS NOT NULL").format(column),
            *clauses,
        ]
    )
    statement = sql.SQL(
        "WITH candidates AS MATERIALIZED ("
        " SELECT study_id, patient_id, {column} <=> %(query)s AS distance"
        " FROM {table} WHERE {where}"
        " ORDER BY distance LIMIT %(k)s"
        ") SELECT study_id, patient_id, distance FROM candidates"
        " ORDER BY distance + 0, study_id"
    ).format(column=column, table=sql.Identifier(TABLE), where=where)
    return statement, params


def indexed_studies(
    conn: psycopg.Connection[Any], study_ids: Sequence[str], model_version: str
) -> set[str] | None:
    """Which of ``study_ids`` have a row for ``model_version``; None when the table is not
    there (the store was never migrated on this database, so nothing can be judged)."""
    found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,)).fetchone()
    if not found or not found[0]:
        return None
    rows = conn.execute(
        sql.SQL("SELECT study_id FROM {} WHERE model_version = %s AND study_id = ANY(%s)").format(
            sql.Identifier(TABLE)
        ),
        (model_version, list(study_ids)),
    ).fetchall()
    return {str(r[0]) for r in rows}


class VectorStore:
    """PostgreSQL + pgvector implementation of :class:`EmbeddingStore`.

    Give it a DSN (it then owns a small connection pool; call :meth:`close` or use ``with``)
    or an open ``ConnectionPool`` shared with the rest of the process (left open). The schema
    must be migrated first (:func:`vector_store.migrate.migrate`).
    """

    def __init__(
        self,
        source: str | ConnectionPool[Any],
        *,
        ef_search: int = DEFAULT_EF_SEARCH,
        max_connections: int = 4,
    ) -> None:
        low, high = EF_SEARCH_RANGE
        if not low <= ef_search <= high:
            raise InputError(f"ef_search must be in {low}..{high}, got {ef_search}")
        self.ef_search = ef_search
        if isinstance(source, str):
            try:
                self._pool: ConnectionPool[Any] = ConnectionPool(
                    source,
                    min_size=1,
                    max_size=max_connections,
                    configure=register_vector,
                    # A connection PostgreSQL dropped (restart, pg_terminate_backend, idle
                    # timeout) is found on checkout and replaced, not handed to a query.
                    check=ConnectionPool.check_connection,
                    open=True,
                    name="vector_store",
                )
                self._pool.wait(timeout=10)
            except Exception as exc:  # PoolTimeout, OperationalError, missing extension
                raise StoreError(f"cannot connect to the vector store: {exc}") from exc
            self._owns_pool = True
        else:
            self._pool = source
            self._owns_pool = False

    def close(self) -> None:
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                # A shared pool's connections were not configured by us.
                if conn.adapters.types.get("halfvec") is None:
                    register_vector(conn)
                with conn.transaction():
                    yield conn
        except psycopg.Error as exc:
            raise StoreError(f"vector store {what} failed: {exc}") from exc

    # --- writes -----------------------------------------------------------------------------

    def upsert(self, record: EmbeddingRecord) -> None:
        """Insert or replace the row of ``record.key``; repeating it changes nothing else."""
        placeholders = sql.SQL("VALUES ({})").format(
            sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS))
        )
        with self._transaction("upsert") as conn:
            conn.execute(_upsert_sql(placeholders), _row(record))

    def upsert_many(self, records: Iterable[EmbeddingRecord]) -> int:
        """Upsert a batch in one transaction through binary COPY; returns the rows written.

        Rows are COPYed into a temporary table and merged with INSERT ... ON CONFLICT, so a
        batch is as idempotent as :meth:`upsert`; within a batch the last record of a key wins.
        Inserting into an existing HNSW graph is row by row; for a large backfill drop the
        indexes first and rebuild them afterwards (:meth:`rebuild_index`).
        """
        latest: dict[tuple[str, str], EmbeddingRecord] = {}
        for record in records:
            latest[record.key] = record
        if not latest:
            return 0
        with self._transaction("bulk upsert") as conn:
            conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE study_embeddings_staging (LIKE {table} INCLUDING DEFAULTS)"
                    " ON COMMIT DROP"
                ).format(table=sql.Identifier(TABLE))
            )
            copy_sql = sql.SQL("COPY study_embeddings_staging ({}) FROM STDIN (FORMAT BINARY)")
            columns = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
            with conn.cursor().copy(copy_sql.format(columns)) as copy:
                copy.set_types(_COPY_TYPES)
                for record in latest.values():
                    copy.write_row(_row(record))
            select = sql.SQL("SELECT {} FROM study_embeddings_staging").format(columns)
            conn.execute(_upsert_sql(select))
            if len(latest) >= _ANALYZE_AFTER_ROWS:
                # Without statistics on freshly loaded rows the planner took model_version = X
                # for selective and chose the primary key plus a sort over the HNSW index (an
                # exact scan); autovacuum would only catch up after its next naptime.
                conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(TABLE)))
        return len(latest)

    def delete(self, study_id: str) -> int:
        """Delete a study's rows under every model version; returns how many went."""
        check_text("study_id", study_id, required=True)
        with self._transaction("delete") as conn:
            cur = conn.execute(
                sql.SQL("DELETE FROM {} WHERE study_id = %s").format(sql.Identifier(TABLE)),
                (study_id,),
            )
            return cur.rowcount

    # --- reads ------------------------------------------------------------------------------

    def get(self, study_id: str, model_version: str) -> EmbeddingRecord | None:
        check_text("study_id", study_id, required=True)
        check_text("model_version", model_version, required=True)
        columns = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        query = sql.SQL(
            "SELECT {}, created_at, updated_at FROM {} WHERE study_id = %s AND model_version = %s"
        ).format(columns, sql.Identifier(TABLE))
        with self._transaction("get") as conn:
            cur = conn.cursor(row_factory=dict_row)
            found = cur.execute(query, (study_id, model_version)).fetchone()
        if found is None:
            return None
        clip, densenet = found.pop("clip_embedding"), found.pop("densenet_features")
        found["positive_findings"] = tuple(found["positive_findings"])
        return EmbeddingRecord(
            clip=None if clip is None else clip.to_numpy().astype(np.float32),
            densenet=None if densenet is None else densenet.to_numpy().astype(np.float32),
            **found,
        )

    def count(self, model_version: str | None = None) -> int:
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(TABLE))
        with self._transaction("count") as conn:
            if model_version is None:
                row = conn.execute(query).fetchone()
            else:
                row = conn.execute(
                    query + sql.SQL(" WHERE model_version = %s"), (model_version,)
                ).fetchone()
        assert row is not None
        return int(row[0])

    def search(
        self,
        vector: Any,
        *,
        space: Space,
        k: int,
        model_version: str,
        filters: SearchFilters | None = None,
        exact: bool = False,
        ef_search: int | None = None,
        clip_version: str | None = None,
    ) -> list[Hit]:
        """The ``k`` rows of ``model_version`` (and, in the clip space, of ``clip_version``)
        nearest to ``vector`` in ``space`` that pass
        ``filters``, most similar first.

        ``exact=True`` compares every matching row (no HNSW), for evaluation. Otherwise HNSW is
        used with iterative scanning; if that still yields fewer than ``k`` rows (pgvector
        stops after ``hnsw.max_scan_tuples`` visited tuples, which a very selective filter can
        exhaust) the query is repeated exactly, so the answer has ``k`` rows whenever ``k``
        rows match.
        """
        checked, query = validate_query(vector, space, k, ef_search)
        check_text("model_version", model_version, required=True)
        check_text("clip_version", clip_version)
        statement, params = search_sql(
            checked, filters or SearchFilters(), clip_version=clip_version
        )
        params.update(query=HalfVector(query), model_version=model_version, k=k)
        # At least k: without iterative scanning one HNSW pass returns at most ef_search rows.
        ef = max(ef_search or self.ef_search, k)
        hits = self._run_search(statement, params, exact=exact, ef_search=ef)
        if len(hits) < k and not exact:
            log.debug("index search returned %d < %d rows; repeating it exactly", len(hits), k)
            hits = self._run_search(statement, params, exact=True, ef_search=ef)
        return hits

    def _run_search(
        self, statement: sql.Composed, params: dict[str, Any], *, exact: bool, ef_search: int
    ) -> list[Hit]:
        with self._transaction("search") as conn:
            # Transaction-local settings (SET LOCAL): a pooled connection must not keep them.
            if exact:
                conn.execute("SELECT set_config('enable_indexscan', 'off', true)")
            else:
                conn.execute(
                    "SELECT set_config('hnsw.ef_search', %s, true),"
                    " set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                    (str(ef_search),),
                )
            # prepare=False: psycopg would otherwise turn this statement into a server-side
            # prepared statement after 5 runs, and PostgreSQL may then reuse a generic plan
            # made under other settings and filters (index vs exact scan), silently ignoring
            # SET LOCAL enable_indexscan / the filter's selectivity. Planning costs ~0.1 ms.
            rows = conn.execute(statement, params, prepare=False).fetchall()
        return [Hit(sid, patient, score_of(float(distance))) for sid, patient, distance in rows]

    # --- index maintenance ------------------------------------------------------------------

    def rebuild_index(
        self,
        space: Space,
        *,
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        maintenance_work_mem: str | None = None,
        parallel_workers: int | None = None,
    ) -> float:
        """Rebuild a space's HNSW index (see :func:`vector_store.migrate.build_hnsw_index`)."""
        with self._pool.connection() as conn:
            return build_hnsw_index(
                conn,
                checked_space(space),
                m=m,
                ef_construction=ef_construction,
                maintenance_work_mem=maintenance_work_mem,
                parallel_workers=parallel_workers,
            )
