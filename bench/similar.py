"""Similar-case search: pgvector HNSW through vector_store against numpy brute force.

Measured in one run on the same machine: bulk load rate (``VectorStore.upsert_many``), HNSW
build time and size, then query latency p50/p99 and recall@10 at several ``ef_search`` values,
unfiltered and with two ~2% filters (a GIN-indexed finding, and an unindexed age that only
pgvector's iterative scan can serve from the HNSW index), next to numpy brute force over the
same vectors. Ground truth is exact cosine over the stored (float16) vectors. Prints, never
asserts.

    .venv/bin/python bench/similar.py                 # 112,120 vectors (NIH ChestX-ray14 size)
    .venv/bin/python bench/similar.py --n 1000000     # ~10 min on 2 cores, needs ~4 GB RAM

The data lives in its own database (``cxr_bench``) on an embedded server in
``.cxr-data/bench`` (port 15434), so test and demo data are never touched; ``--database-url``
uses an existing server instead (the database named there is dropped and recreated).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

Matrix = npt.NDArray[np.float32]

#: The finding that a ~2% filter selects (independent of the embedding, like the notes' data).
RARE_FINDING = "Rare"
#: Ages are uniform over 50 values, so one age keeps ~2% of the rows.
AGE_RANGE = (20, 70)


def clustered_vectors(
    n: int, dim: int = 512, *, clusters: int = 200, seed: int = 42
) -> tuple[Matrix, npt.NDArray[np.int64]]:
    """``n`` unit vectors that resemble single-modality CLIP image embeddings; and cluster ids.

    As in shared/docs/notes/pgvector.md: Dirichlet(0.7) cluster sizes; centres share one
    direction (CLIP embeddings of one modality are strongly anisotropic); within a cluster a
    power-law noise spectrum in a random basis, scaled per cluster, plus a little isotropic
    noise. With n = 112,120 the mean cosine of a held-out query to its 1st / 10th neighbour is
    ~0.78 / 0.76 and to a random vector ~0.25, close to the notes' 0.79 / 0.76 / 0.23.
    """
    rng = np.random.default_rng(seed)

    def unit(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True))

    shared = unit(rng.standard_normal(dim))
    centres = unit(0.6 * shared + 0.8 * unit(rng.standard_normal((clusters, dim))))
    centres = centres.astype(np.float32)
    sizes = rng.multinomial(n, rng.dirichlet(np.full(clusters, 0.7)))
    labels = np.repeat(np.arange(clusters), sizes)
    rng.shuffle(labels)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    spectrum = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    # 0.23 calibrates the neighbour cosines above.
    radius = (0.23 * rng.uniform(0.5, 1.0, clusters)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    step = 65_536  # bounds the temporaries at 1M rows
    for start in range(0, n, step):
        lab = labels[start : start + step]
        z = rng.standard_normal((len(lab), dim), dtype=np.float32) * spectrum
        noise = (z @ basis) * radius[lab, None]
        noise += 0.02 * rng.standard_normal((len(lab), dim), dtype=np.float32)
        out[start : start + step] = unit(centres[lab] + noise)
    return out, labels.astype(np.int64)


@dataclass(frozen=True)
class Metadata:
    """Filter columns, drawn independently of the embeddings."""

    patient_ids: list[str]
    genders: npt.NDArray[np.str_]
    views: npt.NDArray[np.str_]
    ages: npt.NDArray[np.int64]
    rare: npt.NDArray[np.bool_]


def synthetic_metadata(n: int, *, seed: int = 7) -> Metadata:
    """Gender 50/50, view PA 60%, age uniform over 50 years, the rare finding on 2%."""
    rng = np.random.default_rng(seed)
    return Metadata(
        patient_ids=[f"p{i}" for i in rng.integers(0, max(1, n // 4), n)],
        genders=np.where(rng.random(n) < 0.5, "female", "male"),
        views=np.where(rng.random(n) < 0.6, "PA", "AP"),
        ages=rng.integers(*AGE_RANGE, n),
        rare=rng.random(n) < 0.02,
    )


def exact_top_k(
    matrix: Matrix, queries: Matrix, k: int, rows: npt.NDArray[np.int64] | None = None
) -> npt.NDArray[np.int64]:
    """Indices (into ``matrix``) of the exact top-k cosine neighbours of each unit query."""
    index = np.arange(len(matrix)) if rows is None else rows
    sub = matrix[index]
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), 100):
        sims = queries[start : start + 100] @ sub.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + 100] = index[np.take_along_axis(top, order, axis=1)]
    return out


def percentiles_ms(seconds: Sequence[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000.0, [50, 99])
    return float(p50), float(p99)


def time_calls(fn: Callable[[int], Any], count: int) -> tuple[list[float], list[Any]]:
    times: list[float] = []
    results: list[Any] = []
    for i in range(count):
        t0 = time.perf_counter()
        results.append(fn(i))
        times.append(time.perf_counter() - t0)
    return times, results


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=112_120, help="stored vectors")
    parser.add_argument("--queries", type=int, default=300, help="queries per configuration")
    parser.add_argument("--exact-queries", type=int, default=50, help="queries for exact mode")
    parser.add_argument("--ef", default="40,64,100,200", help="ef_search values to measure")
    parser.add_argument("--m", type=int, default=None, help="HNSW m (default: DEFAULT_M)")
    parser.add_argument("--ef-construction", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1, help="parallel index build workers")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".cxr-data" / "bench")
    parser.add_argument("--port", type=int, default=15434)
    parser.add_argument("--database-url", default=None, help="use this server, not embedded")
    return parser.parse_args(argv)


def _prepare_database(args: argparse.Namespace) -> tuple[str, Callable[[], None]]:
    """A fresh ``cxr_bench`` database; returns its URL and how to clean up after the run."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from fhir_service.database import start_database, stop_database
    from fhir_service.settings import Settings

    if args.database_url:
        url = args.database_url
        stop: Callable[[], None] = lambda: None  # noqa: E731
    else:
        settings = Settings(data_dir=args.data_dir, pg_port=args.port, database_url=None)
        info = start_database(settings)
        url = make_conninfo(info.url, dbname="cxr_bench")
        started = info.started_s > 0

        def stop() -> None:
            if started:  # leave a server that was already running as we found it
                stop_database(settings)

    dbname = conninfo_to_dict(url).get("dbname") or "cxr_bench"
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(str(dbname))))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(dbname))))
    return url, stop


def _size_mb(url: str, relation: str) -> float:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (relation,)).fetchone()
    return float(row[0]) / 2**20 if row else float("nan")


def _plan(url: str, space: str, filters: Any, query: Matrix, ef: int) -> str:
    """The scan node PostgreSQL picks for this search (index, bitmap or sequential)."""
    import psycopg
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector
    from psycopg import sql

    from vector_store.store import search_sql

    statement, params = search_sql(space, filters)  # type: ignore[arg-type]
    params.update(query=HalfVector(query), model_version="bench", k=10)
    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute(
            "SELECT set_config('hnsw.ef_search', %s, true),"
            " set_config('hnsw.iterative_scan', 'relaxed_order', true)",
            (str(ef),),
        )
        lines = conn.execute(sql.SQL("EXPLAIN (COSTS OFF) ") + statement, params).fetchall()
    scans = [ln[0].strip().lstrip("-> ") for ln in lines if "Scan" in ln[0]]
    return "; ".join(scans)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    from vector_store.migrate import DEFAULT_EF_CONSTRUCTION, DEFAULT_M, drop_hnsw_index, migrate
    from vector_store.store import DEFAULT_EF_SEARCH, EmbeddingRecord, SearchFilters, VectorStore

    m = args.m or DEFAULT_M
    efc = args.ef_construction or DEFAULT_EF_CONSTRUCTION
    ef_values = [int(v) for v in args.ef.split(",")]
    n, k = args.n, 10
    print(f"similar-case search benchmark: n={n:,} x 512 (halfvec), m={m}, ef_construction={efc},")
    print(
        f"  defaults m={DEFAULT_M} ef_construction={DEFAULT_EF_CONSTRUCTION} "
        f"ef_search={DEFAULT_EF_SEARCH}; {args.queries} queries per row, k={k}"
    )

    url, stop = _prepare_database(args)
    try:
        migrate(url)
        for space in ("clip", "densenet"):
            drop_hnsw_index(url, space)

        t0 = time.perf_counter()
        vectors, _ = clustered_vectors(n + args.queries)
        data, queries = vectors[:n], vectors[n:]
        meta = synthetic_metadata(n)
        print(f"generate vectors: {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        records = [
            EmbeddingRecord(
                study_id=f"s{i}",
                model_version="bench",
                study_version_id="1",
                clip=data[i],
                patient_id=meta.patient_ids[i],
                gender=str(meta.genders[i]),
                age=int(meta.ages[i]),
                view_position=str(meta.views[i]),
                positive_findings=(RARE_FINDING,) if meta.rare[i] else (),
            )
            for i in range(n)
        ]
        build_records_s = time.perf_counter() - t0

        store = VectorStore(url)
        t0 = time.perf_counter()
        written = store.upsert_many(records)
        load_s = time.perf_counter() - t0
        del records
        print(f"build EmbeddingRecords: {build_records_s:.1f} s ({n / build_records_s:,.0f}/s)")
        print(
            f"bulk load upsert_many (COPY BINARY + INSERT ON CONFLICT): {load_s:.1f} s, "
            f"{written / load_s:,.0f} rows/s; table {_size_mb(url, 'study_embeddings'):.0f} MB"
        )

        build_s = store.rebuild_index(
            "clip",
            m=m,
            ef_construction=efc,
            parallel_workers=args.workers,
            maintenance_work_mem="512MB" if n <= 300_000 else "3GB",
        )
        index_mb = _size_mb(url, "study_embeddings_clip_hnsw")
        print(
            f"HNSW build (m={m}, ef_construction={efc}, {args.workers} parallel worker(s)): "
            f"{build_s:.1f} s, index {index_mb:.0f} MB"
        )

        # Ground truth over what is stored (float16), the numpy peer over float32 as an
        # application holding the matrix in memory would.
        stored = data.astype(np.float16).astype(np.float32)
        stored /= np.linalg.norm(stored, axis=1, keepdims=True)

        def numpy_query(i: int) -> npt.NDArray[np.int64]:
            sims = data @ queries[i]
            top = np.argpartition(-sims, k - 1)[:k]
            return top[np.argsort(-sims[top])]

        numpy_query(0)
        np_times, _ = time_calls(numpy_query, args.queries)
        np_p50, np_p99 = percentiles_ms(np_times)
        t0 = time.perf_counter()
        exact_top_k(data, queries, k)
        batched = time.perf_counter() - t0
        print(
            f"numpy brute force (float32 {n:,}x512, 1 query): p50 {np_p50:.2f} ms, "
            f"p99 {np_p99:.2f} ms; batched {args.queries} queries {batched:.2f} s "
            f"({args.queries / batched:,.0f} q/s)"
        )

        modes: list[tuple[str, Any, npt.NDArray[np.int64] | None]] = [
            ("unfiltered", SearchFilters(), None),
            (
                f"finding={RARE_FINDING} (GIN)",
                SearchFilters(finding=RARE_FINDING),
                np.flatnonzero(meta.rare),
            ),
            (
                "age=45 (no index)",
                SearchFilters(age_min=45, age_max=45),
                np.flatnonzero(meta.ages == 45),
            ),
        ]
        print()
        print(
            f"{'filter':<26} {'kept':>6} {'mode':<10} {'recall@10':>9} {'rows':>5} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'x numpy p50':>11}"
        )
        for name, filters, rows in modes:
            kept = 1.0 if rows is None else len(rows) / n
            truth = exact_top_k(stored, queries, k, rows)
            print(
                f"  plan at ef_search {DEFAULT_EF_SEARCH}: "
                f"{_plan(url, 'clip', filters, queries[0], DEFAULT_EF_SEARCH)}"
            )

            def run(
                i: int, ef: int | None = None, exact: bool = False, flt: Any = filters
            ) -> list[str]:
                hits = store.search(
                    queries[i],
                    space="clip",
                    k=k,
                    model_version="bench",
                    filters=flt,
                    exact=exact,
                    ef_search=ef,
                )
                return [h.study_id for h in hits]

            for _ in range(20):  # warm caches and the pool
                run(0, ef_values[0])
            configs: list[tuple[str, dict[str, Any], int]] = [
                (f"ef={ef}", {"ef": ef}, args.queries) for ef in ef_values
            ]
            configs.append(("exact", {"exact": True}, args.exact_queries))
            for label, kwargs, count in configs:
                times, results = time_calls(functools.partial(run, **kwargs), count)
                found = [{int(s[1:]) for s in r} for r in results]
                recall = statistics.fmean(
                    len(f & set(truth[i].tolist())) / k for i, f in enumerate(found)
                )
                mean_rows = statistics.fmean(len(r) for r in results)
                p50, p99 = percentiles_ms(times)
                print(
                    f"{name:<26} {kept:>6.3f} {label:<10} {recall:>9.3f} {mean_rows:>5.1f} "
                    f"{p50:>7.2f} {p99:>7.2f} {np_p50 / p50:>10.1f}x"
                )
        store.close()
    finally:
        stop()


if __name__ == "__main__":
    main()
