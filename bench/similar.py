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

Then (``--http auto``, the default: whenever HAPI, PostgreSQL and ``cxr serve`` can be
started) the latency of a full ``$similar`` HTTP call at 112,120 vectors, at the service's
FHIR base and through HAPI's, next to the direct store query the service makes. That stack
runs in ``untrained`` mode on its own data dir and ports (``.cxr-data/bench-similar``, HAPI
18380, PostgreSQL 15580, service 18301; wiped first): the synthetic vectors are loaded into
``study_embeddings`` under the model version the service searches with, and the exact 15
nearest neighbours of each query study are real ImagingStudy resources in HAPI (the rest are
ids HAPI does not have, which the service would silently drop), so each call returns 10
studies read from HAPI in one search. ``--http off`` skips it, ``--http on`` fails if the
stack cannot start.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

from bench._common import load, stack_settings  # noqa: E402
from vector_store.synthetic import (  # noqa: E402
    RARE_FINDING,
    Matrix,
    Metadata,
    clustered_vectors,
    exact_top_k,
    record,
    synthetic_metadata,
)


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
    http = parser.add_argument_group("$similar over HTTP (service and through HAPI)")
    http.add_argument(
        "--http",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: run it when the stack can be started (default); on: fail if it cannot",
    )
    http.add_argument("--http-n", type=int, default=112_120, help="stored vectors")
    http.add_argument("--http-calls", type=int, default=200, help="calls per endpoint")
    http.add_argument("--http-anchors", type=int, default=20, help="distinct query studies")
    http.add_argument("--http-data-dir", type=Path, default=REPO / ".cxr-data" / "bench-similar")
    http.add_argument("--hapi-port", type=int, default=18380)
    http.add_argument("--http-pg-port", type=int, default=15580)
    http.add_argument("--service-port", type=int, default=18301)
    return parser.parse_args(argv)


def _prepare_database(args: argparse.Namespace) -> tuple[str, Callable[[], None]]:
    """A fresh ``cxr_bench`` database; returns its URL and how to clean up after the run."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from fhir_service.ops.database import start_database, stop_database
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
    from vector_store.records import DEFAULT_EF_SEARCH, SearchFilters
    from vector_store.store import VectorStore

    m = args.m or DEFAULT_M
    efc = args.ef_construction or DEFAULT_EF_CONSTRUCTION
    ef_values = [int(v) for v in args.ef.split(",")]
    n, k = args.n, 10
    print(f"load average at start: {load()}")
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
        records = [record(meta, data, i, f"s{i}", "bench") for i in range(n)]
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

    if args.http != "off":
        reuse = (data, meta) if n == args.http_n else None
        del vectors, queries, stored
        http_section(args, reuse)
    print(f"load average at end: {load()}")


# --- $similar over HTTP ------------------------------------------------------------------------

#: Exact neighbours of each query study that are made real ImagingStudy resources in HAPI.
REAL_NEIGHBOURS = 15


def _http_settings(args: argparse.Namespace) -> Any:
    return stack_settings(
        args.http_data_dir,
        hapi_port=args.hapi_port,
        pg_port=args.http_pg_port,
        service_port=args.service_port,
    )


def _create_studies(fhir: Any, count: int, records: Sequence[Any]) -> list[str]:
    """``count`` real ImagingStudy resources (NIH sample metadata, one Patient), in batches."""
    from fhir_service.ingest.transaction import created_id, imaging_study_resource, patient_resource

    patient = patient_resource(dataclasses.replace(records[0], patient_id="bench-similar"))
    pid = fhir.create(patient)["id"]
    ids: list[str] = []
    for start in range(0, count, 50):
        entries = []
        for i in range(start, min(count, start + 50)):
            rec = records[i % len(records)]
            rec = dataclasses.replace(rec, image_index=f"{rec.image_index}-sim{i}")
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                    "resource": imaging_study_resource(rec, f"Patient/{pid}"),
                    "request": {"method": "POST", "url": "ImagingStudy"},
                }
            )
        response = fhir.transaction(
            {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        )
        for entry in response["entry"]:
            ids.append(created_id({"entry": [entry]}, "ImagingStudy"))
    return ids


def http_section(args: argparse.Namespace, reuse: tuple[Matrix, Metadata] | None) -> None:
    """Latency of ``GET .../ImagingStudy/{id}/$similar?count=10`` at the service and at HAPI."""
    import httpx

    from cxr_errors import CxrError
    from fhir_service.fhir.client import FhirClient
    from fhir_service.ingest.nih import read_manifest
    from fhir_service.ops import hapi_server
    from fhir_service.ops.database import start_database, stop_database
    from fhir_service.ops.stack import start_service, stop_all
    from fhir_service.runtime import model_version_for
    from vector_store.migrate import drop_hnsw_index, migrate
    from vector_store.records import DEFAULT_EF_SEARCH, SearchFilters
    from vector_store.store import VectorStore

    settings = _http_settings(args)
    n, k = args.http_n, 10
    print()
    print(
        f"$similar over HTTP: n={n:,} synthetic vectors, {args.http_calls} calls per endpoint "
        f"over {args.http_anchors} query studies, count={k}, ef_search {DEFAULT_EF_SEARCH}"
    )
    print(
        "  UNTRAINED mode (CXR_MODEL_WEIGHTS=untrained, CLIP untrained): pretrained weights "
        "cannot be downloaded here; $similar by study never runs a model"
    )
    print(f"  load average at start of section: {load()}")

    def stop() -> None:
        stop_all(settings)
        hapi_server.stop(settings)
        stop_database(settings)

    stop()
    for sub in (settings.hapi_dir, settings.pg_dir, settings.log_dir, settings.run_dir):
        shutil.rmtree(sub, ignore_errors=True)
    try:
        try:
            boot = hapi_server.start(settings, progress=lambda _m: None)
            db = start_database(settings)
        except (CxrError, OSError) as exc:
            if args.http == "on":
                raise
            print(f"  skipped: the stack cannot be started here ({exc})")
            return
        url = db.url
        model_version = model_version_for(settings)
        records = list(read_manifest(settings.shared_dir / "data" / "nih-sample" / "manifest.csv"))

        if reuse is not None:
            data, meta = reuse
        else:
            vectors, _ = clustered_vectors(n)
            data, meta = vectors, synthetic_metadata(n)
        stored = data.astype(np.float16).astype(np.float32)
        stored /= np.linalg.norm(stored, axis=1, keepdims=True)
        rng = np.random.default_rng(11)
        anchors = rng.choice(n, size=args.http_anchors, replace=False)
        # Row 0 of each exact top-(R+1) is the anchor itself: it must exist in HAPI too.
        neighbours = exact_top_k(stored, stored[anchors], REAL_NEIGHBOURS + 1)
        real_rows = sorted(set(neighbours.ravel().tolist()) | set(anchors.tolist()))

        t0 = time.perf_counter()
        with FhirClient(settings.fhir_base_url, timeout=120) as fhir:
            hapi_ids = _create_studies(fhir, len(real_rows), records)
        create_s = time.perf_counter() - t0
        study_ids = [f"syn{i}" for i in range(n)]
        for row, sid in zip(real_rows, hapi_ids, strict=True):
            study_ids[row] = sid
        print(
            f"  stack: HAPI {settings.fhir_base_url} (boot {boot:.0f} s), PostgreSQL "
            f":{settings.pg_port}, model version {model_version}"
        )
        print(
            f"  {len(real_rows)} real ImagingStudy resources in HAPI ({create_s:.1f} s, batches "
            f"of 50): the query studies and their exact {REAL_NEIGHBOURS} nearest neighbours"
        )

        migrate(url)
        for space in ("clip", "densenet"):
            drop_hnsw_index(url, space)
        records_ = (record(meta, data, i, study_ids[i], model_version) for i in range(n))
        with VectorStore(url) as store:
            t0 = time.perf_counter()
            store.upsert_many(records_)
            load_s = time.perf_counter() - t0
            build_s = store.rebuild_index("clip", maintenance_work_mem="512MB")
            store.rebuild_index("densenet")
        print(
            f"  loaded {n:,} rows in {load_s:.1f} s, HNSW (default m/ef_construction) built in "
            f"{build_s:.1f} s"
        )
        service_s = start_service(settings)
        print(f"  service {settings.service_url} ready in {service_s:.0f} s")

        queries = [study_ids[int(a)] for a in anchors]
        calls = args.http_calls

        rows: list[tuple[str, list[float], list[int]]] = []
        with VectorStore(url) as direct_store:

            def direct(i: int) -> int:
                # What the service runs in SQL: read the study's embedding, then the k-NN.
                sid = queries[i % len(queries)]
                record = direct_store.get(sid, model_version)
                vector = record.vector("clip") if record is not None else None
                assert vector is not None
                hits = direct_store.search(
                    vector,
                    space="clip",
                    k=k,
                    model_version=model_version,
                    filters=SearchFilters(exclude_study=sid),
                )
                return len(hits)

            for i in range(20):
                direct(i)
            times, counts = time_calls(direct, calls)
            rows.append(("direct: store.get + store.search (SQL only)", times, counts))

        endpoints = [
            (
                "service: GET {service}/fhir/ImagingStudy/{id}/$similar",
                f"{settings.service_url}/fhir",
            ),
            ("through HAPI: GET {hapi}/fhir/ImagingStudy/{id}/$similar", settings.fhir_base_url),
        ]
        timed: list[tuple[list[float], list[int]]] = [([], []) for _ in endpoints]
        # The service key (a trusted system caller); a SMART token would add one JWKS check.
        headers = {
            "Accept": "application/fhir+json",
            "Authorization": f"Bearer {settings.service_api_key}",
        }
        with httpx.Client(timeout=60, headers=headers) as http:

            def call(fhir_base: str, i: int) -> int:
                sid = queries[i % len(queries)]
                r = http.get(f"{fhir_base}/ImagingStudy/{sid}/$similar", params={"count": k})
                if r.status_code != 200:
                    raise SystemExit(f"$similar {r.status_code}: {r.text[:300]}")
                return len(r.json().get("entry", []))

            for i in range(20):  # warm the connections, the pools and HAPI's JIT
                for _, fhir_base in endpoints:
                    call(fhir_base, i)
            # Interleaved, so that both endpoints see the same (shared, noisy) machine.
            for i in range(calls):
                for (_, fhir_base), (times, counts) in zip(endpoints, timed, strict=True):
                    t0 = time.perf_counter()
                    counts.append(call(fhir_base, i))
                    times.append(time.perf_counter() - t0)
        rows += [(label, *tc) for (label, _), tc in zip(endpoints, timed, strict=True)]

        print()
        print(f"  {'call':<58} {'p50 ms':>7} {'p99 ms':>7} {'mean':>7} {'entries':>7}")
        for label, times, counts in rows:
            p50, p99 = percentiles_ms(times)
            mean = statistics.fmean(times) * 1000.0
            entries = statistics.fmean(counts)
            print(f"  {label:<58} {p50:>7.2f} {p99:>7.2f} {mean:>7.2f} {entries:>7.1f}")
        print(f"  load average at end of section: {load()}")
    finally:
        stop()


if __name__ == "__main__":
    main()
