"""End-to-end pipeline: POST a study to HAPI → DiagnosticReport visible, against a naive loop.

Measured in one run on one machine, on the same NIH sample images:

* **latency**, one study at a time (each waits for its report before the next is posted), split
  from PostgreSQL's own job events (``procrastinate_events.at``, same clock as this process):
  HAPI delivery (POST → job deferred by the rest-hook receiver; includes HAPI's transaction
  and its subscription matching interval), queue wait (deferred → started), inference +
  write-back (started → succeeded), and the total (POST → report found by polling HAPI);
* **throughput**: a batch of studies posted at once, time until every report exists in HAPI,
  with 1 and then 2 ``cxr worker`` processes;
* **the peer**: a naive loop in this process that polls HAPI for new ImagingStudies (at the
  same interval as HAPI's subscription matching), runs the same analyzer on the same pixels,
  and writes the same resources one per request (each entry of ``build_result_transaction``
  POSTed on its own, urn:uuid references replaced by the ids already created) — timed on the
  same latency and batch runs while the workers are stopped.

Prints, never asserts. Runs in ``untrained`` mode (pretrained weights cannot be downloaded
here) and says so. Its own data dir and ports (``.cxr-data/bench-pipeline``, HAPI 18280,
PostgreSQL 15480, service 18201), wiped at start except the exported ONNX models, so tests and
the demo running at the same time are not touched.

    .venv/bin/python bench/pipeline.py                  # 20 + 20 studies, ~6-8 min on 2 cores
    .venv/bin/python bench/pipeline.py --latency-studies 5 --batch 10   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

from bench._common import add_stack_arguments, load, stack_settings, wait_for, wipe_stack_state  # noqa: E402
from fhir_service.fhir import identifiers, results  # noqa: E402
from fhir_service.fhir.client import FhirClient  # noqa: E402
from fhir_service.ingest.nih import NihRecord, read_manifest  # noqa: E402
from fhir_service.ingest.transaction import created_id, study_bundle  # noqa: E402
from fhir_service.ops import hapi_server  # noqa: E402
from fhir_service.ops.database import start_database, stop_database  # noqa: E402
from fhir_service.ops.stack import start_service, start_workers, stop_all, worker_process  # noqa: E402
from fhir_service.runtime import model_version_for  # noqa: E402
from fhir_service.settings import Settings  # noqa: E402
from subscriptions.metrics import JOB_STAGES, read_snapshots  # noqa: E402

PROCESS_TASK = "cxr.process_study"


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


@dataclass
class Study:
    """One posted study and what we measured about it (wall-clock epoch seconds)."""

    index: int
    study_id: str = ""
    posted: float = 0.0  # before the POST
    post_done: float = 0.0  # the transaction response arrived
    visible: float = 0.0  # the report was first found in HAPI
    deferred: float = 0.0
    started: float = 0.0
    succeeded: float = 0.0
    # naive loop
    seen: float = 0.0
    inferred: float = 0.0  # analyze() returned
    infer_s: float = 0.0


class Bench:
    def __init__(self, settings: Settings, dsn: str, records: list[NihRecord]) -> None:
        self.settings = settings
        self.dsn = dsn
        self.records = records
        self.fhir = FhirClient(settings.fhir_base_url, timeout=60)
        self.model_version = model_version_for(settings)
        self.images = [
            (settings.shared_dir / "data" / "nih-sample" / r.image_index).read_bytes()
            for r in records
        ]
        self._tag = 0

    def post(self, study: Study, tag: str) -> None:
        rec = self.records[study.index % len(self.records)]
        data = self.images[study.index % len(self.records)]
        bundle = study_bundle(rec, data, tag=tag)
        study.posted = time.time()
        with FhirClient(self.settings.fhir_base_url, timeout=60) as fhir:  # thread-safe per call
            study.study_id = created_id(fhir.transaction(bundle), "ImagingStudy")
        study.post_done = time.time()

    def new_tag(self, phase: str) -> str:
        self._tag += 1
        return f"bench{int(time.time())}{phase}{self._tag}"

    def report_identifier(self, study_id: str) -> str:
        system, value = identifiers.study_model_identifier(study_id, self.model_version)
        return f"{system}|{value}"

    def has_report(self, study_id: str) -> bool:
        return (
            self.fhir.count("DiagnosticReport", {"identifier": self.report_identifier(study_id)})
            > 0
        )

    def reported(self, studies: Sequence[Study]) -> int:
        """How many of ``studies`` have a report, in one search (identifiers OR-ed)."""
        total = 0
        for i in range(0, len(studies), 15):  # keeps the URL well under HAPI's 8 KiB limit
            ids = ",".join(self.report_identifier(s.study_id) for s in studies[i : i + 15])
            total += self.fhir.count("DiagnosticReport", {"identifier": ids})
        return total

    def job_events(self, studies: Sequence[Study]) -> None:
        """Fill deferred / started / succeeded from procrastinate's event table."""
        import psycopg

        by_id = {s.study_id: s for s in studies}
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT j.args->>'study_id', e.type::text, "
                "       extract(epoch FROM min(e.at)), extract(epoch FROM max(e.at)) "
                "FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id "
                "WHERE j.task_name = %s AND j.args->>'study_id' = ANY(%s) "
                "GROUP BY 1, 2",
                (PROCESS_TASK, list(by_id)),
            ).fetchall()
        for sid, kind, first, last in rows:
            s = by_id[sid]
            if kind == "deferred":
                s.deferred = float(first)
            elif kind == "started":
                s.started = float(first)
            elif kind == "succeeded":
                s.succeeded = float(last)

    def workers_alive(self) -> int:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM procrastinate_workers "
                "WHERE last_heartbeat > now() - interval '30 seconds'"
            ).fetchone()
        return int(row[0]) if row else 0


# --- the naive peer ------------------------------------------------------------------------


class NaiveLoop(threading.Thread):
    """Poll HAPI for new ImagingStudies, analyze, write every resource with its own POST."""

    def __init__(self, settings: Settings, analyzer: Any, poll_s: float) -> None:
        super().__init__(daemon=True, name="naive-loop")
        self.settings = settings
        self.analyzer = analyzer
        self.poll_s = poll_s
        self.since = datetime.now(UTC)
        self.seen: set[str] = set()
        self.done: dict[str, dict[str, float]] = {}
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self.stop_event = threading.Event()

    def run(self) -> None:
        from subscriptions.pixels import fetch_pixels

        fhir = FhirClient(self.settings.fhir_base_url, timeout=60)
        watermark = self.since.isoformat(timespec="milliseconds")
        while not self.stop_event.is_set():
            bundle = fhir.search(
                "ImagingStudy",
                {
                    "_lastUpdated": f"gt{watermark}",
                    "status": "available",
                    "_sort": "_lastUpdated",
                    "_count": "500",
                },
            )
            new = [
                e["resource"]
                for e in bundle.get("entry", [])
                if e["resource"]["id"] not in self.seen
            ]
            if not new:
                self.stop_event.wait(self.poll_s)
                continue
            for study in new:
                sid = study["id"]
                self.seen.add(sid)
                timing = {"seen": time.time()}
                try:
                    pixels = fetch_pixels(fhir, study, max_bytes=self.settings.max_image_bytes)
                    t0 = time.perf_counter()
                    result = self.analyzer.analyze(pixels.data, pixels.source)
                    timing["infer_s"] = time.perf_counter() - t0
                    timing["inferred"] = time.time()
                    bundle_tx = results.build_result_transaction(
                        study=study,
                        analysis=result.analysis,
                        heatmaps=result.heatmaps,
                        image_sha256=hashlib.sha256(pixels.data).hexdigest(),
                        recorded=datetime.now(UTC),
                    )
                    self._write_one_by_one(fhir, bundle_tx, timing)
                    timing["done"] = time.time()
                except Exception as exc:  # report, keep serving the others
                    self.errors.append(f"ImagingStudy/{sid}: {exc}")
                    timing["done"] = time.time()
                with self.cond:
                    self.done[sid] = timing
                    self.cond.notify_all()
        fhir.close()

    @staticmethod
    def _write_one_by_one(
        fhir: FhirClient, bundle: dict[str, Any], timing: dict[str, float]
    ) -> None:
        resolved: dict[str, str] = {}
        for entry in bundle["entry"]:
            text = json.dumps(entry)
            for urn, ref in resolved.items():
                text = text.replace(urn, ref)
            e = json.loads(text)
            created = fhir.create(e["resource"], if_none_exist=e["request"].get("ifNoneExist"))
            resolved[entry["fullUrl"]] = f"{created['resourceType']}/{created['id']}"
            if created["resourceType"] == "DiagnosticReport":
                timing["visible"] = time.time()

    def wait(self, study_ids: Sequence[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not all(s in self.done for s in study_ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"naive loop: timed out after {timeout_s:.0f} s")
                self.cond.wait(left)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=120)


# --- phases --------------------------------------------------------------------------------


def stage_totals(dsn: str) -> dict[str, tuple[float, float]]:
    """(seconds, count) per job stage, summed over every worker's published metrics."""
    out: dict[str, list[float]] = {}
    for _live, families in read_snapshots(dsn):
        for family in families:
            if family["name"] != "cxr_job_stage_seconds":
                continue
            for name, labels, value in family["samples"]:
                slot = out.setdefault(labels.get("stage", "?"), [0.0, 0.0])
                if name.endswith("_sum"):
                    slot[0] += float(value)
                elif name.endswith("_count"):
                    slot[1] += float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def stage_split(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean seconds of each stage per *reported study* between two :func:`stage_totals`:
    every job of the study counts (the study's own notification and its Media's, which finds
    the report already there), so the split adds up to the worker time one study costs."""
    reported = after.get("transaction", (0.0, 0.0))[1] - before.get("transaction", (0.0, 0.0))[1]
    if reported <= 0:
        return {}
    return {
        stage: (after[stage][0] - before.get(stage, (0.0, 0.0))[0]) / reported
        for stage in JOB_STAGES
        if stage in after
    }


def latency_ours(bench: Bench, n: int, first: int) -> list[Study]:
    studies = [Study(first + i) for i in range(n)]
    tag = bench.new_tag("lat")
    for s in studies:
        bench.post(s, tag)
        wait_for(
            f"report of ImagingStudy/{s.study_id}", lambda s=s: bench.has_report(s.study_id), 180
        )
        s.visible = time.time()
    # The job is acknowledged (succeeded) after the report is written; wait for the events.
    wait_for(
        "job events",
        lambda: bench.job_events(studies) or all(s.succeeded for s in studies),
        60,
        0.2,
    )
    return studies


def latency_naive(bench: Bench, naive: NaiveLoop, n: int, first: int) -> list[Study]:
    studies = [Study(first + i) for i in range(n)]
    tag = bench.new_tag("nlat")
    for s in studies:
        bench.post(s, tag)
        naive.wait([s.study_id], 180)
        t = naive.done[s.study_id]
        s.seen, s.inferred = t["seen"], t.get("inferred", 0.0)
        s.infer_s, s.visible = t.get("infer_s", 0.0), t.get("visible", t["done"])
        s.succeeded = t["done"]
    return studies


@dataclass
class Batch:
    label: str
    studies: list[Study] = field(default_factory=list)
    t0: float = 0.0
    t1: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.t1 - self.t0

    @property
    def per_min(self) -> float:
        return 60.0 * len(self.studies) / self.wall_s

    def totals(self) -> list[float]:
        return [s.visible - s.posted for s in self.studies if s.visible]


def post_batch(bench: Bench, studies: list[Study], tag: str) -> None:
    # One patient per study: concurrent conditional creates of one Patient conflict (409).
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda s: bench.post(s, f"{tag}s{s.index}"), studies))


def batch_ours(bench: Bench, label: str, n: int, first: int) -> Batch:
    batch = Batch(label, [Study(first + i) for i in range(n)])
    tag = bench.new_tag("batch")
    batch.t0 = time.time()
    post_batch(bench, batch.studies, tag)
    wait_for(
        f"{n} reports",
        lambda: bench.reported(batch.studies) >= n,
        60 + 30 * n,
        0.2,
    )
    batch.t1 = time.time()
    # Per-study "visible" under load: the job's succeeded event (report written just before).
    wait_for(
        "job events",
        lambda: bench.job_events(batch.studies) or all(s.succeeded for s in batch.studies),
        60,
        0.2,
    )
    for s in batch.studies:
        s.visible = s.succeeded
    return batch


def batch_naive(bench: Bench, naive: NaiveLoop, n: int, first: int) -> Batch:
    batch = Batch("naive loop (1 process)", [Study(first + i) for i in range(n)])
    tag = bench.new_tag("nbatch")
    batch.t0 = time.time()
    post_batch(bench, batch.studies, tag)
    naive.wait([s.study_id for s in batch.studies], 60 + 30 * n)
    batch.t1 = max(naive.done[s.study_id]["done"] for s in batch.studies)
    for s in batch.studies:
        t = naive.done[s.study_id]
        s.visible = t.get("visible", t["done"])
    return batch


def warm_up(bench: Bench, what: str, first: int, n: int = 1) -> float:
    """Post ``n`` studies at once (one per worker) and wait for their reports."""
    studies = [Study(first + i) for i in range(n)]
    post_batch(bench, studies, bench.new_tag("warm"))
    wait_for(f"{what} warm-up", lambda: bench.reported(studies) >= n, 600, 0.2)
    return time.time() - min(s.posted for s in studies)


# --- report --------------------------------------------------------------------------------


def row(label: str, values: Sequence[float]) -> str:
    ms = [v * 1000.0 for v in values]
    return f"  {label:<52} {pct(ms, 50):>8.0f} {pct(ms, 95):>8.0f} {len(ms):>4}"


def print_latency(ours: list[Study], naive: list[Study], poll_s: float, interval_ms: int) -> None:
    print()
    print(f"latency, one study at a time (ms)                      {'p50':>8} {'p95':>8} {'n':>4}")
    ok = [s for s in ours if s.deferred and s.started and s.succeeded]
    print("ours: HAPI → rest-hook → queue → cxr worker (1 worker)")
    print(row("HAPI POST transaction (client → response)", [s.post_done - s.posted for s in ok]))
    print(
        row(
            f"(a) HAPI delivery (POST → job deferred; match {interval_ms} ms)",
            [s.deferred - s.posted for s in ok],
        )
    )
    print(row("(b) queue wait (deferred → started)", [s.started - s.deferred for s in ok]))
    print(
        row(
            "(c) inference + write-back (started → succeeded)",
            [s.succeeded - s.started for s in ok],
        )
    )
    print(
        row(
            "total (POST → report found in HAPI, polled 50 ms)",
            [s.visible - s.posted for s in ours],
        )
    )
    print(f"naive loop: poll HAPI every {poll_s:g} s, analyze, one POST per resource")
    print(row("(a) poll delay (POST → study seen)", [s.seen - s.posted for s in naive]))
    print(
        row(
            "(c1) pixels + inference (seen → analyze() returned)",
            [s.inferred - s.seen for s in naive],
        )
    )
    print(row("     of which analyze() alone", [s.infer_s for s in naive]))
    print(
        row(
            "(c2) write-back, one POST per resource (→ all written)",
            [s.succeeded - s.inferred for s in naive],
        )
    )
    print(row("total (POST → DiagnosticReport POSTed)", [s.visible - s.posted for s in naive]))


def print_split(split: dict[str, float]) -> None:
    """The worker time of one reported study, stage by stage (see :func:`stage_split`)."""
    print()
    print(
        "worker time by stage, mean ms per reported study, all its jobs (the study's and its "
        "Media's notification; cxr_job_stage_seconds)"
    )
    for stage, seconds in split.items():
        print(f"  {stage:<20} {seconds * 1000:>8.1f}")
    print(f"  {'sum of stages':<20} {sum(split.values()) * 1000:>8.1f}")


def print_throughput(batches: list[Batch]) -> None:
    print()
    print(
        f"throughput, batch posted at once     {'studies':>7} {'wall s':>7} {'studies/min':>11} "
        f"{'p50 s':>6} {'p95 s':>6}"
    )
    for b in batches:
        tot = b.totals()
        print(
            f"  {b.label:<34} {len(b.studies):>7} {b.wall_s:>7.1f} {b.per_min:>11.1f} "
            f"{pct(tot, 50):>6.1f} {pct(tot, 95):>6.1f}"
        )
    naive = batches[-1]
    ratios = ", ".join(f"{b.label}: {b.per_min / naive.per_min:.2f}x" for b in batches[:-1])
    print(f"ratio ours / naive throughput: {ratios}")


# --- main ----------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-studies", type=int, default=20, help="posted one at a time")
    parser.add_argument("--batch", type=int, default=20, help="studies posted at once")
    parser.add_argument("--naive-poll", type=float, default=0.5, help="naive loop poll interval s")
    parser.add_argument(
        "--warm-up",
        type=int,
        default=20,
        help="studies posted (at once) before anything is timed, so that HAPI's JIT has "
        "compiled the paths a running server uses (0: time a server that has just booted)",
    )
    add_stack_arguments(
        parser,
        REPO / ".cxr-data" / "bench-pipeline",
        hapi_port=18280,
        pg_port=15480,
        service_port=18201,
    )
    return parser.parse_args(argv)


def served_graphs(settings: Settings) -> str:
    """What worker 0 logged it serves (``auto`` precisions resolved), from its log."""
    text = worker_process(settings, 0).log_file.read_text(encoding="utf-8", errors="replace")
    lines = [line for line in text.splitlines() if "serving graphs:" in line]
    return lines[-1].split("serving graphs:", 1)[1].strip() if lines else "(not in its log)"


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    settings = stack_settings(
        args.data_dir,
        hapi_port=args.hapi_port,
        pg_port=args.pg_port,
        service_port=args.service_port,
    )
    t_start = time.monotonic()
    print("pipeline benchmark: POST ImagingStudy → DiagnosticReport in HAPI, ours vs a naive loop")
    print(f"load average at start: {load()}")
    print(
        "UNTRAINED weights (CXR_MODEL_WEIGHTS=untrained, CLIP untrained): pretrained weights "
        "cannot be downloaded here;\n  timings are those of the real architectures, the scores "
        "are not findings."
    )
    records = list(read_manifest(settings.shared_dir / "data" / "nih-sample" / "manifest.csv"))

    stop_all(settings)
    hapi_server.stop(settings)
    stop_database(settings)
    wipe_stack_state(settings)
    try:
        boot = hapi_server.start(settings, progress=lambda _m: None)
        db = start_database(settings)
        service_s = start_service(settings)
        bench = Bench(settings, db.url, records)
        sizes = [len(b) for b in bench.images]
        print(
            f"stack: HAPI {settings.fhir_base_url} (H2, boot {boot:.0f} s), PostgreSQL "
            f":{settings.pg_port} (pgvector {db.pgvector}), service {settings.service_url} "
            f"(ready {service_s:.0f} s); data dir {settings.data_dir}"
        )
        print(
            f"model version {bench.model_version}; images: {len(records)} NIH sample PNGs, "
            f"{np.mean(sizes) / 1024:.0f} KiB mean, used in order and reused with new "
            "identifiers per phase"
        )
        print(
            f"serving graphs: DenseNet {settings.model_backend} {settings.model_precision}, "
            f"CLIP {settings.clip_backend} {settings.clip_precision} (CXR_MODEL_BACKEND, "
            "CXR_MODEL_PRECISION, CXR_CLIP_BACKEND, CXR_CLIP_PRECISION)"
        )

        first = 0
        start_workers(settings, 1)
        wait_for("worker 0", lambda: bench.workers_alive() >= 1, 300, 0.5)
        print(f"worker 0 up; first study (model warm-up) {warm_up(bench, 'worker', first):.1f} s")
        print(f"served by worker 0: {served_graphs(settings)}")
        first += 1
        if args.warm_up:
            n = args.warm_up
            took = warm_up(bench, "server", first, n)
            print(f"server warm-up: {n} studies at once, {took:.1f} s")
            first += n

        before = stage_totals(db.url)
        ours_lat = latency_ours(bench, args.latency_studies, first)
        # each worker publishes its metrics after every job; wait for the last job's
        wait_for(
            "the workers' stage metrics",
            lambda: (
                stage_totals(db.url).get("transaction", (0, 0))[1]
                >= before.get("transaction", (0, 0))[1] + args.latency_studies
            ),
            30,
            0.2,
        )
        split = stage_split(before, stage_totals(db.url))
        batches = [batch_ours(bench, "ours, 1 worker", args.batch, first)]
        start_workers(settings, 2)
        wait_for("worker 1", lambda: bench.workers_alive() >= 2, 300, 0.5)
        print(f"worker 1 up; warm-up of both workers {warm_up(bench, 'workers', first, 2):.1f} s")
        batches.append(batch_ours(bench, "ours, 2 workers", args.batch, first))

        # The peer runs alone: stop the workers (the service keeps receiving rest-hooks and
        # queueing jobs nobody runs, a few ms each on HAPI and the service).
        for i in range(2):
            worker_process(settings, i).stop()
        from fhir_service.runtime import build_analyzer

        t0 = time.perf_counter()
        analyzer = build_analyzer(settings)
        print(f"naive loop: analyzer loaded in {time.perf_counter() - t0:.1f} s (same settings)")
        naive = NaiveLoop(settings, analyzer, args.naive_poll)
        naive.start()
        s = Study(0)
        bench.post(s, bench.new_tag("nwarm"))
        naive.wait([s.study_id], 300)
        naive_lat = latency_naive(bench, naive, args.latency_studies, first)
        batches.append(batch_naive(bench, naive, args.batch, first))
        naive.stop()
        if naive.errors:
            print(f"naive loop errors ({len(naive.errors)}): {naive.errors[:3]}")

        print_latency(ours_lat, naive_lat, args.naive_poll, settings.hapi_subscription_interval_ms)
        print_split(split)
        print_throughput(batches)
        print()
        print(
            f"load average at end: {load()}; benchmark wall time {time.monotonic() - t_start:.0f} s"
        )
    finally:
        if not args.keep:
            stop_all(settings)
            hapi_server.stop(settings)
            stop_database(settings)


if __name__ == "__main__":
    main()
