"""VectorStore against the real PostgreSQL + pgvector, and the in-memory fake against it."""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

from cxr_errors import InputError, StoreError
from vector_store.memory import InMemoryVectorStore
from vector_store.migrate import (
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_M,
    MIGRATIONS_DIR,
    applied_migrations,
    drop_hnsw_index,
    hnsw_index_options,
    load_migrations,
    migrate,
)
from vector_store.records import EmbeddingRecord, EmbeddingStore, SearchFilters
from vector_store.store import VectorStore, indexed_studies
from vector_store.synthetic import clustered_vectors

pytestmark = pytest.mark.integration

MODEL = "test-model-1"
N = 2_000
GENDERS = ["male", "female", "other", "unknown", None]
VIEWS = ["PA", "AP", "LL"]
FINDINGS = ["Effusion", "Cardiomegaly", "Nodule"]


def _records(n: int = N) -> list[EmbeddingRecord]:
    """Clustered CLIP vectors (so the HNSW graph is realistic), ReLU-like DenseNet features on
    two thirds of the rows, and filter columns in every combination, including unknowns."""
    clip, _ = clustered_vectors(n, seed=3)
    rng = np.random.default_rng(5)
    densenet = np.maximum(rng.normal(0.2, 1.0, (n, 1024)), 0).astype(np.float32)
    records = []
    for i in range(n):
        records.append(
            EmbeddingRecord(
                study_id=f"study-{i:05d}",
                model_version=MODEL,
                study_version_id=str(1 + i % 3),
                clip=clip[i],
                densenet=densenet[i] if i % 3 else None,
                patient_id=None if i % 50 == 0 else f"patient-{i // 4}",
                gender=GENDERS[i % 5],
                age=None if i % 10 == 0 else 18 + (i * 7) % 80,
                view_position=VIEWS[i % 3],
                positive_findings=tuple(f for j, f in enumerate(FINDINGS) if (i >> j) % 4 == 0),
                image_sha256=f"{i:064x}",
            )
        )
    return records


@pytest.fixture(scope="module")
def url(fresh_database: Callable[[str], str]) -> str:
    url = fresh_database("cxr_test_vector_store")
    migrate(url)
    return url


@pytest.fixture(scope="module")
def records() -> list[EmbeddingRecord]:
    return _records()


@pytest.fixture(scope="module")
def loaded(url: str, records: list[EmbeddingRecord]) -> Iterator[VectorStore]:
    """The real store with the module's records, in a table of its own model version."""
    with VectorStore(url) as store:
        # A bulk load the recommended way: graph built once after the COPY, not row by row.
        for space in ("clip", "densenet"):
            drop_hnsw_index(url, space)
        store.upsert_many(records)
        for space in ("clip", "densenet"):
            store.rebuild_index(space, parallel_workers=0)  # type: ignore[arg-type]
        yield store


@pytest.fixture(scope="module")
def fake(records: list[EmbeddingRecord]) -> InMemoryVectorStore:
    store = InMemoryVectorStore()
    store.upsert_many(records)
    return store


@functools.cache
def _held_out(count: int = 30) -> np.ndarray[Any, Any]:
    """Query vectors: held-out draws from the records' clusters."""
    vectors, _ = clustered_vectors(N + count, seed=3)
    return vectors[N:]


def _queries(count: int) -> np.ndarray[Any, Any]:
    return _held_out()[:count]


# --- migrations -----------------------------------------------------------------------------


def test_migrations_are_recorded_idempotent_and_match_defaults(url: str) -> None:
    assert migrate(url) == []  # the fixture applied them already
    recorded = applied_migrations(url)
    assert recorded == {m.version: m.checksum for m in load_migrations()}
    for space in ("clip", "densenet"):
        assert hnsw_index_options(url, space) == {
            "m": DEFAULT_M,
            "ef_construction": DEFAULT_EF_CONSTRUCTION,
        }
    with psycopg.connect(url) as conn:
        storage: dict[str, str] = dict(
            conn.execute(
                "SELECT attname, attstorage FROM pg_attribute WHERE attrelid = "
                "'study_embeddings'::regclass AND attname IN ('clip_embedding', "
                "'densenet_features')"
            ).fetchall()
        )
    # PLAIN: never TOASTed (see the migration).
    assert storage == {"clip_embedding": "p", "densenet_features": "p"}


def test_concurrent_first_migrations_apply_once(fresh_database: Callable[[str], str]) -> None:
    url = fresh_database("cxr_test_vector_store_concurrent")
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            barrier.wait()
            results.append(migrate(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [[], [], [], [m.version for m in load_migrations()]]


def test_a_migration_edited_after_it_was_applied_is_refused(url: str, tmp_path: Path) -> None:
    for path in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)
    first = sorted(tmp_path.glob("001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(StoreError, match="edited after it was applied"):
        migrate(url, directory=tmp_path)


# --- writes -----------------------------------------------------------------------------------


def test_upsert_is_idempotent_and_replaces_values(url: str) -> None:
    rng = np.random.default_rng(1)
    base = EmbeddingRecord(
        "s-upsert", "m-upsert", "1", clip=rng.normal(size=512).astype(np.float32), age=40
    )
    with VectorStore(url) as store:
        store.upsert(base)
        first = store.get("s-upsert", "m-upsert")
        store.upsert(base)
        changed = EmbeddingRecord(
            "s-upsert",
            "m-upsert",
            "2",
            clip=rng.normal(size=512).astype(np.float32),
            densenet=rng.random(1024, dtype=np.float32),
            age=41,
            positive_findings=("Effusion",),
        )
        store.upsert(changed)
        assert store.count("m-upsert") == 1
        got = store.get("s-upsert", "m-upsert")
        assert first is not None and got is not None
        assert (got.study_version_id, got.age, got.positive_findings) == ("2", 41, ("Effusion",))
        assert got.clip is not None and changed.clip is not None
        np.testing.assert_allclose(got.clip, changed.clip, atol=1e-3)
        assert got.created_at == first.created_at
        assert got.updated_at is not None and first.updated_at is not None
        assert got.updated_at > first.updated_at

        # A batch is idempotent too, and within a batch the last record of a key wins.
        batch = [
            EmbeddingRecord(
                f"s-batch-{i}", "m-upsert", "1", clip=rng.normal(size=512).astype(np.float32)
            )
            for i in range(5)
        ]
        last = EmbeddingRecord(
            "s-batch-0", "m-upsert", "9", clip=rng.normal(size=512).astype(np.float32)
        )
        assert store.upsert_many([*batch, last]) == 5
        assert store.upsert_many(batch[1:]) == 4
        assert store.upsert_many([]) == 0
        assert store.count("m-upsert") == 6
        again = store.get("s-batch-0", "m-upsert")
        assert again is not None and again.study_version_id == "9"

        assert store.delete("s-upsert") == 1
        assert store.get("s-upsert", "m-upsert") is None
        assert store.delete("s-upsert") == 0


def test_get_round_trips_every_field(loaded: VectorStore, records: list[EmbeddingRecord]) -> None:
    source = records[7]
    got = loaded.get(source.study_id, MODEL)
    assert got is not None
    for name in ("study_version_id", "patient_id", "gender", "age", "view_position"):
        assert getattr(got, name) == getattr(source, name), name
    assert got.positive_findings == source.positive_findings
    assert got.image_sha256 == source.image_sha256
    assert got.clip is not None and source.clip is not None
    assert got.densenet is not None and source.densenet is not None
    # float16 storage of unit vectors: ~3 significant digits.
    np.testing.assert_allclose(got.clip, source.clip, atol=1e-3)
    np.testing.assert_allclose(got.densenet, source.densenet, atol=1e-3)
    assert loaded.get(source.study_id, "other-model") is None
    assert loaded.get("no-such-study", MODEL) is None


def test_indexed_studies_names_the_rows_of_one_model_version(
    url: str,
    loaded: VectorStore,
    records: list[EmbeddingRecord],
    fresh_database: Callable[[str], str],
) -> None:
    """What the census asks for every reported study (the gap a job stopped between its FHIR
    transaction and its upsert leaves); None on a database the store never migrated."""
    asked = [records[0].study_id, records[1].study_id, "no-such-study"]
    with psycopg.connect(url) as conn:
        assert indexed_studies(conn, asked, MODEL) == set(asked[:2])
        assert indexed_studies(conn, asked, "other-model") == set()
    with psycopg.connect(fresh_database("cxr_test_vector_store_unmigrated")) as conn:
        assert indexed_studies(conn, asked, MODEL) is None


# --- search -----------------------------------------------------------------------------------

FILTERS = [
    SearchFilters(),
    SearchFilters(gender="female"),
    SearchFilters(view_position="AP"),
    SearchFilters(age_min=30, age_max=40),
    SearchFilters(age_min=90),
    SearchFilters(finding="Nodule"),
    SearchFilters(exclude_patient="patient-3"),
    SearchFilters(patient="patient-3"),
    SearchFilters(gender="male", view_position="PA", finding="Effusion", age_max=60),
    SearchFilters(exclude_study="study-00004"),
]


def _matches(record: EmbeddingRecord, f: SearchFilters) -> bool:
    """The filters' meaning, written out independently of both stores."""
    return (
        (f.exclude_patient is None or record.patient_id != f.exclude_patient)
        and (f.patient is None or record.patient_id == f.patient)
        and (f.exclude_study is None or record.study_id != f.exclude_study)
        and (f.gender is None or record.gender == f.gender)
        and (f.view_position is None or record.view_position == f.view_position)
        and (f.age_min is None or (record.age is not None and record.age >= f.age_min))
        and (f.age_max is None or (record.age is not None and record.age <= f.age_max))
        and (f.finding is None or f.finding in record.positive_findings)
    )


@pytest.mark.parametrize("filters", FILTERS, ids=repr)
def test_filters_are_honoured_and_the_fake_agrees(
    loaded: VectorStore,
    fake: InMemoryVectorStore,
    records: list[EmbeddingRecord],
    filters: SearchFilters,
) -> None:
    by_id = {r.study_id: r for r in records}
    query = _queries(1)[0]
    for space in ("clip", "densenet"):
        vector = query if space == "clip" else by_id["study-00005"].densenet
        real = loaded.search(vector, space=space, k=100, model_version=MODEL, filters=filters)
        exact = loaded.search(
            vector,
            space=space,
            k=100,
            model_version=MODEL,
            filters=filters,
            exact=True,
        )
        faked = fake.search(vector, space=space, k=100, model_version=MODEL, filters=filters)
        expected = [r for r in records if _matches(r, filters) and r.vector(space) is not None]
        assert len(exact) == min(100, len(expected))
        assert all(_matches(by_id[h.study_id], filters) for h in real + exact)
        assert [h.study_id for h in faked] == [h.study_id for h in exact]
        np.testing.assert_allclose([h.score for h in faked], [h.score for h in exact], atol=1e-5)
        scores = [h.score for h in exact]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert [h.patient_id for h in exact] == [by_id[h.study_id].patient_id for h in exact]
        # The index may differ from exact only in the last ranks (approximate search).
        overlap = len({h.study_id for h in real} & {h.study_id for h in exact})
        assert len(real) == len(exact) and overlap >= 0.95 * len(exact)


def test_index_and_exact_search_agree(loaded: VectorStore, url: str) -> None:
    queries = _queries(30)
    overlaps = []
    for q in queries:
        approx = loaded.search(q, space="clip", k=10, model_version=MODEL)
        exact = loaded.search(q, space="clip", k=10, model_version=MODEL, exact=True)
        overlaps.append(len({h.study_id for h in approx} & {h.study_id for h in exact}) / 10)
    assert np.mean(overlaps) >= 0.98
    # ...and the comparison is between two different plans.
    assert "study_embeddings_clip_hnsw" in _plan(url, queries[0], exact=False)
    assert "study_embeddings_clip_hnsw" not in _plan(url, queries[0], exact=True)


def _plan(url: str, query: np.ndarray[Any, Any], *, exact: bool) -> str:
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector
    from psycopg import sql

    from vector_store.store import search_sql

    statement, params = search_sql("clip", SearchFilters())
    params.update(query=HalfVector(query), model_version=MODEL, k=10)
    with psycopg.connect(url) as conn:
        register_vector(conn)
        if exact:
            conn.execute("SET LOCAL enable_indexscan = off")
        rows = conn.execute(sql.SQL("EXPLAIN ") + statement, params).fetchall()
    return "\n".join(r[0] for r in rows)


def test_selective_filter_still_returns_k(
    loaded: VectorStore, records: list[EmbeddingRecord]
) -> None:
    query = _queries(1)[0]
    few = SearchFilters(gender="male", view_position="LL", finding="Cardiomegaly", age_min=20)
    matching = [r for r in records if _matches(r, few)]
    assert 10 < len(matching) < 100  # selective: a few % of the rows
    assert len(loaded.search(query, space="clip", k=10, model_version=MODEL, filters=few)) == 10
    rare = SearchFilters(exclude_patient=None, age_min=97)
    expected = sum(_matches(r, rare) for r in records)
    hits = loaded.search(query, space="clip", k=100, model_version=MODEL, filters=rare)
    assert len(hits) == expected


def test_search_settings_do_not_leak_and_nothing_is_prepared(url: str) -> None:
    """A shared pool's connection must come back with default settings, and the search must
    not become a server-side prepared statement (its plan depends on those settings)."""
    query = _queries(1)[0]
    with ConnectionPool(url, min_size=1, max_size=1, open=True) as pool:
        store = VectorStore(pool)
        for i in range(8):  # psycopg prepares a statement after its 5th execution
            store.search(
                query, space="clip", k=5, model_version=MODEL, exact=bool(i % 2), ef_search=200
            )
        with pool.connection() as conn:
            settings = conn.execute(
                "SELECT current_setting('enable_indexscan'), current_setting('hnsw.ef_search'),"
                " current_setting('hnsw.iterative_scan')"
            ).fetchone()
            prepared = conn.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%candidates%'"
            ).fetchone()
        store.close()  # a shared pool stays open
        assert not pool.closed
    assert settings == ("on", "40", "off")
    assert prepared == (0,)


def test_a_connection_the_server_dropped_is_replaced_not_used(
    url: str, loaded: VectorStore
) -> None:
    """After PostgreSQL terminates the pool's idle connections (a restart, an administrator),
    the next read gets a fresh connection instead of failing with the dead one."""
    name = "cxr_test_dropped"
    with VectorStore(make_conninfo(url, application_name=name), max_connections=1) as store:
        assert store.count(MODEL) >= 0
        with psycopg.connect(url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND application_name = %s",
                (name,),
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        assert store.get("study-00001", MODEL) is not None


def test_other_model_versions_are_not_searched(loaded: VectorStore) -> None:
    query = _queries(1)[0]
    assert loaded.search(query, space="clip", k=10, model_version="no-such-model") == []


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an integer in 1..100"),
        ({"k": 101}, "k must be an integer in 1..100"),
        ({"k": True}, "k must be an integer"),
        ({"space": "pixels"}, "unknown space 'pixels'"),
        ({"vector": np.ones(511)}, "must have 512 dimensions"),
        ({"vector": np.ones((2, 512))}, "must have 512 dimensions"),
        ({"space": "densenet"}, "must have 1024 dimensions"),
        ({"vector": np.full(512, np.nan)}, "NaN or infinite"),
        ({"vector": np.zeros(512)}, "zero length"),
        ({"vector": ["a"] * 512}, "not a numeric vector"),
        ({"ef_search": 0}, "ef_search must be an integer in 1..1000"),
        ({"model_version": ""}, "model_version must be a non-empty string"),
    ],
)
def test_bad_search_input_is_an_input_error(
    loaded: VectorStore, fake: InMemoryVectorStore, kwargs: dict[str, Any], message: str
) -> None:
    call: dict[str, Any] = {
        "vector": np.ones(512),
        "space": "clip",
        "k": 10,
        "model_version": MODEL,
    }
    call.update(kwargs)
    stores: list[EmbeddingStore] = [loaded, fake]
    for store in stores:
        with pytest.raises(InputError, match=message):
            store.search(**call)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"age_min": 50, "age_max": 40}, "age_min .50. is greater than age_max .40."),
        ({"age_min": -1}, "age_min must be an integer in 0..150"),
        ({"gender": "F"}, "gender must be one of"),
        ({"finding": ""}, "finding must be a non-empty string"),
        ({"view_position": "x" * 300}, "longer than 256"),
    ],
)
def test_bad_filters_are_input_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        SearchFilters(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip": None}, "needs a clip or densenet vector"),
        ({"clip": np.ones(1024)}, "must have 512 dimensions"),
        ({"study_id": " "}, "study_id must be a non-empty string"),
        ({"age": 151}, "age must be an integer in 0..150"),
        ({"image_sha256": "ABC"}, "image_sha256 must be 64 lowercase hex digits"),
        ({"positive_findings": "Effusion"}, "not one string"),
    ],
)
def test_bad_records_are_input_errors(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "study_id": "s",
        "model_version": "m",
        "study_version_id": "1",
        "clip": np.ones(512),
    }
    fields.update(kwargs)
    with pytest.raises(InputError, match=message):
        EmbeddingRecord(**fields)


# --- CLIP versions (migration 002) --------------------------------------------------------------


def test_rows_from_before_clip_versions_survive_migration_002(
    fresh_database: Callable[[str], str], tmp_path: Path
) -> None:
    """A database migrated to 001 with a row in it takes 002: the row is kept with an unknown
    CLIP version, still serves the densenet space and never a versioned clip search."""
    url = fresh_database("cxr_test_clip_version_migration")
    first = sorted(MIGRATIONS_DIR.glob("001_*.sql"))[0]
    shutil.copy(first, tmp_path / first.name)
    migrate(url, directory=tmp_path)
    rng = np.random.default_rng(4)
    clip, densenet = rng.normal(size=512), rng.normal(size=1024)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO study_embeddings (study_id, model_version, study_version_id,"
            " clip_embedding, densenet_features) VALUES ('old', 'm1', '1', %s, %s)",
            (
                str((clip / np.linalg.norm(clip)).tolist()),
                str((densenet / np.linalg.norm(densenet)).tolist()),
            ),
        )
    assert migrate(url) == [2]
    with VectorStore(url) as store:
        old = store.get("old", "m1")
        assert old is not None and old.clip_version is None and old.clip is not None
        assert [
            h.study_id for h in store.search(densenet, space="densenet", k=5, model_version="m1")
        ] == ["old"]
        assert store.search(clip, space="clip", k=5, model_version="m1", clip_version="c1") == []
        store.upsert(EmbeddingRecord("new", "m1", "1", clip=clip, clip_version="c1"))
        got = store.get("new", "m1")
        assert got is not None and got.clip_version == "c1"
        hits = store.search(clip, space="clip", k=5, model_version="m1", clip_version="c1")
        assert [h.study_id for h in hits] == ["new"]
        assert store.search(clip, space="clip", k=5, model_version="m1", clip_version="c2") == []


def test_the_fake_store_keys_clip_the_same_way() -> None:
    clip = np.random.default_rng(5).normal(size=512)
    store = InMemoryVectorStore()
    store.upsert(EmbeddingRecord("a", "m1", "1", clip=clip, clip_version="c1"))
    store.upsert(EmbeddingRecord("b", "m1", "1", clip=clip, clip_version="c2"))
    store.upsert(EmbeddingRecord("c", "m1", "1", clip=clip))
    hits = store.search(clip, space="clip", k=5, model_version="m1", clip_version="c1")
    assert [h.study_id for h in hits] == ["a"]
    with pytest.raises(InputError, match="clip_version needs a clip vector"):
        EmbeddingRecord("d", "m1", "1", densenet=np.ones(1024), clip_version="c1")
