"""`cxr ingest nih --bulk-inference` against the subscription path, on the same NIH images.

Both paths load the same rows of the shared NIH sample (``manifest.csv`` with ``--images``
pointing at the sample PNGs: Patient + ImagingStudy ``available`` + Media with the pixels
inline, the default bounding boxes, ingest batch 50 / concurrency 2) and are timed from the
start of the ingest until **every study has its DiagnosticReport in HAPI**:

* **subscription path**: the ingest alone; HAPI's rest-hook notifies ``cxr serve``, which
  queues one job per study; ``--workers`` (default 1) ``cxr worker`` processes run them one
  image at a time. The clock stops when ``DiagnosticReport?_summary=count`` (polled every
  0.25 s once the ingest has returned) reaches the number of images.
* **bulk path**: the same ingest with ``process_studies=Pipeline.process_batch``, exactly
  what ``cxr ingest nih --bulk-inference`` does (the CLI's own :func:`bulk_pipeline`): the
  committed studies are handed over ``--batch-size`` at a time and the model sees them in
  one batched pass; the reports exist when the ingest returns (checked by the same count).

Making it fair (and what is left unequal):

* **Same work.** Each path runs on a fresh stack (HAPI on H2 and PostgreSQL wiped, ``cxr
  serve`` restarted; exported ONNX graphs kept), so both ingests create every resource and
  both run the model on every image; re-running the ingest on the same HAPI would only find
  "already reported". Both use the worker's own :class:`~subscriptions.pipeline.Pipeline`
  (read study, fetch pixels, check for a report, model pass with TTA + CLIP + heatmaps, one
  result transaction, embedding upsert, Task check). After each path the script counts the
  reports, Observations, Media and embeddings, and at the end compares every Observation's
  numbers per image between the two paths (issue 6: "results identical").
* **The Subscription still fires during the bulk run**: the ingest creates the studies
  ``available``, so HAPI notifies and the service queues a job per study, as it would on a
  live system. No worker runs during the bulk path, so nothing infers twice; the queued jobs
  are counted and left (a worker started later would find each study "already reported":
  one study read, pixels hashed, one search — not in the bulk figure). A worker running
  *during* a bulk ingest would race the ingest for the same studies and repeat the model
  work (the conditional creates keep the results single).
* **Model load and warm-up are outside both clocks**: the worker is started, seen alive and
  warmed with one tagged study before its ingest; the bulk pipeline is built (its load time is
  printed: the CLI pays it once per run) and warmed with one tagged study through
  ``process_batch`` plus one batched pass of ``--batch-size`` images. Both warm HAPI's JVM
  with the same study transaction and one result transaction.
* **CPU**: one worker and the bulk pipeline each use ONNX Runtime's default threads (all
  cores). The bulk path runs the model in this process's main thread while the ingest keeps
  up to two transactions in flight; on the subscription path the worker overlaps the ingest
  too. HAPI, PostgreSQL and the service share the same two cores in both.

Prints, never asserts. Untrained weights (pretrained ones cannot be downloaded here); the
output says so. Own data dir and ports (``.cxr-data/bench-bulk``, HAPI 18680, PostgreSQL
15880, service 18601), wiped at start except the exported ONNX models.

    .venv/bin/python bench/bulk.py                 # all 56 sample images, ~10 min on 2 busy cores
    .venv/bin/python bench/bulk.py --images 8      # a quick look (~5 min: two stack boots)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

from bench._common import add_stack_arguments, load, stack_settings, wait_for  # noqa: E402
from fhir_service.cli.ingest import bulk_pipeline  # noqa: E402
from fhir_service.fhir.client import FhirClient  # noqa: E402
from fhir_service.ingest import (  # noqa: E402
    IngestOptions,
    IngestReport,
    Row,
    ingest,
    nih,
    read_rows,
    transaction,
)
from fhir_service.ops import hapi_server  # noqa: E402
from fhir_service.ops.database import database_url, start_database, stop_database  # noqa: E402
from fhir_service.ops.stack import start_service, start_workers, stop_all  # noqa: E402
from fhir_service.runtime import model_version_for  # noqa: E402
from fhir_service.settings import Settings  # noqa: E402
from subscriptions.bootstrap import SUBSCRIPTION_ID  # noqa: E402

PROCESS_TASK = "cxr.process_study"
#: How often the clocks poll HAPI: often enough for a minutes-long wall time, rarely enough
#: not to load the server being measured.
POLL_S = 0.25
#: One Observation's numbers: value, confidence band low/high, then each component's value.
Fingerprint = tuple[tuple[str, tuple[float, ...]], ...]


@dataclass
class PathResult:
    label: str
    images: int = 0
    wall_s: float = 0.0
    ingest_s: float = 0.0
    work: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    inference: dict[str, int] = field(default_factory=dict)
    results: dict[str, Fingerprint] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0


class Bench:
    def __init__(self, settings: Settings, args: argparse.Namespace) -> None:
        self.settings = settings
        self.args = args
        self.sample = settings.shared_dir / "data" / "nih-sample"
        self.manifest = self.sample / "manifest.csv"
        rows = [r for r in read_rows(self.manifest) if isinstance(r, Row)]
        self.n = min(args.images or len(rows), len(rows))
        self.rows = rows[: self.n]
        self.dsn = database_url(settings)

    # --- the stack ------------------------------------------------------------------------

    def teardown(self) -> None:
        stop_all(self.settings)
        hapi_server.stop(self.settings)
        stop_database(self.settings)

    def fresh_stack(self) -> str:
        """Stop, wipe (keeping {data_dir}/models) and start HAPI, PostgreSQL and the service;
        wait for the Subscription to be active."""
        s = self.settings
        self.teardown()
        for sub in (s.hapi_dir, s.pg_dir, s.log_dir, s.run_dir, s.data_dir / "ingest"):
            shutil.rmtree(sub, ignore_errors=True)
        boot = hapi_server.start(s, progress=lambda _m: None)
        db = start_database(s)
        service_s = start_service(s)
        with FhirClient(s.fhir_base_url, timeout=30) as fhir:
            wait_for(
                "the Subscription to be active",
                lambda: fhir.read("Subscription", SUBSCRIPTION_ID).get("status") == "active",
                120,
                POLL_S,
            )
        return (
            f"fresh stack: HAPI {s.fhir_base_url} (H2, boot {boot:.0f} s), PostgreSQL "
            f":{s.pg_port} (pgvector {db.pgvector}), service {s.service_url} "
            f"({service_s:.0f} s), Subscription active"
        )

    def options(self) -> IngestOptions:
        """What ``cxr ingest nih --metadata manifest.csv --images DIR --limit N`` builds."""
        s = self.settings
        return IngestOptions(
            metadata=self.manifest,
            state_dir=s.ingest_state_dir or s.data_dir / "ingest",
            images=self.sample,
            limit=self.n,
            batch_size=s.ingest_batch_size,
            concurrency=s.ingest_concurrency,
            resume=False,
            max_image_bytes=s.max_image_bytes,
            bbox=nih.default_bbox_path(),
            inference_batch_size=self.args.batch_size,
        )

    def post_warmup(self, fhir: FhirClient, tag: str) -> str:
        """One study with tagged identifiers (not one of the measured rows): its id."""
        rec = self.rows[0].rec
        data = (self.sample / rec.image_index).read_bytes()
        return transaction.created_id(
            fhir.transaction(transaction.study_bundle(rec, data, tag=tag)), "ImagingStudy"
        )

    # --- what was done --------------------------------------------------------------------

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            return list(conn.execute(query, params).fetchall())

    def workers_alive(self) -> int:
        rows = self.sql(
            "SELECT count(*) FROM procrastinate_workers "
            "WHERE last_heartbeat > now() - interval '30 seconds'"
        )
        return int(rows[0][0]) if rows else 0

    def tally(self, fhir: FhirClient, result: PathResult) -> None:
        result.work = {
            kind: fhir.count(kind) for kind in ("DiagnosticReport", "Observation", "Media")
        }
        result.work["embeddings"] = int(self.sql("SELECT count(*) FROM study_embeddings")[0][0])
        result.jobs = {
            str(status): int(n)
            for status, n in self.sql(
                "SELECT status::text, count(*) FROM procrastinate_jobs WHERE task_name = %s "
                "GROUP BY 1 ORDER BY 1",
                (PROCESS_TASK,),
            )
        }
        result.results = fingerprints(fhir, {r.rec.image_index for r in self.rows})

    # --- the two paths --------------------------------------------------------------------

    def subscription(self) -> PathResult:
        workers = self.args.workers
        result = PathResult(f"subscription ({workers} cxr worker{'s' * (workers > 1)})")
        print(self.fresh_stack(), flush=True)
        t = time.monotonic()
        start_workers(self.settings, workers)
        wait_for(f"{workers} worker(s)", lambda: self.workers_alive() >= workers, 600, 0.5)
        print(f"  {workers} worker(s) alive after {time.monotonic() - t:.1f} s (model load)")
        with (
            FhirClient(self.settings.fhir_base_url, timeout=300) as fhir,
            FhirClient(self.settings.fhir_base_url, timeout=60) as poll,
        ):
            t = time.monotonic()
            for i in range(workers):
                self.post_warmup(fhir, f"warm{i}")
            wait_for(
                "warm-up reports", lambda: poll.count("DiagnosticReport") >= workers, 600, POLL_S
            )
            print(f"  warm-up: {workers} tagged stud(ies) reported in {time.monotonic() - t:.1f} s")
            baseline = poll.count("DiagnosticReport")
            t0 = time.monotonic()
            report = ingest(fhir, self.options())
            result.ingest_s = time.monotonic() - t0
            wait_for(
                f"{self.n} reports",
                lambda: poll.count("DiagnosticReport") >= baseline + self.n,
                120 + 30 * self.n,
                POLL_S,
            )
            result.wall_s = time.monotonic() - t0
            self._check(report, result)
            # The job is acknowledged after its report is written: let the last one finish.
            wait_for(
                "the last job to succeed",
                lambda: (
                    not self.sql(
                        "SELECT 1 FROM procrastinate_jobs WHERE task_name = %s "
                        "AND status IN ('todo', 'doing')",
                        (PROCESS_TASK,),
                    )
                ),
                60,
                POLL_S,
            )
            self.tally(poll, result)
        return result

    def bulk(self) -> PathResult:
        result = PathResult(f"--bulk-inference (batch {self.args.batch_size})")
        print(self.fresh_stack(), flush=True)
        with ExitStack() as stack:
            t = time.monotonic()
            pipeline = stack.enter_context(bulk_pipeline(self.settings))
            print(
                f"  bulk pipeline built in {time.monotonic() - t:.1f} s (model load; "
                "`cxr ingest --bulk-inference` pays this once per run, outside the clock here)"
            )
            fhir = stack.enter_context(FhirClient(self.settings.fhir_base_url, timeout=300))
            t = time.monotonic()
            warm = self.post_warmup(fhir, "warmbulk")
            outcome = pipeline.process_batch([(warm, "1")])
            images = [
                ((self.sample / r.rec.image_index).read_bytes(), r.rec.image_index)
                for r in (self.rows * self.args.batch_size)[: self.args.batch_size]
            ]
            pipeline.analyzer.analyze_many(images)
            print(
                f"  warm-up: 1 tagged study through process_batch ({outcome[0]}) + one pass "
                f"of {len(images)} images in {time.monotonic() - t:.1f} s"
            )
            baseline = fhir.count("DiagnosticReport")
            t0 = time.monotonic()
            report = ingest(fhir, self.options(), process_studies=pipeline.process_batch)
            result.ingest_s = time.monotonic() - t0
            wait_for(
                f"{self.n} reports",
                lambda: fhir.count("DiagnosticReport") >= baseline + self.n,
                60,
                POLL_S,
            )
            result.wall_s = time.monotonic() - t0
            self._check(report, result)
            result.inference = dict(report.inference)
            self.tally(fhir, result)
        return result

    def _check(self, report: IngestReport, result: PathResult) -> None:
        result.images = report.rows_with_images
        if report.failed or report.rows_created != self.n or report.rows_with_images != self.n:
            print(
                f"  WARNING: ingest created {report.rows_created} studies, "
                f"{report.rows_with_images} with images, {len(report.failed)} failed "
                f"(expected {self.n})"
            )


def fingerprints(fhir: FhirClient, image_indexes: set[str]) -> dict[str, Fingerprint]:
    """image index → the numbers of its 14 Observations, keyed by code (ids differ by path)."""
    study_image: dict[str, str] = {}
    for study in fhir.search_all("ImagingStudy", {"_count": 200}):
        for ident in study.get("identifier", []):
            if (
                ident.get("system") == transaction.IMAGE_INDEX_SYSTEM
                and ident["value"] in image_indexes
            ):
                study_image[str(study["id"])] = str(ident["value"])
    found: dict[str, list[tuple[str, tuple[float, ...]]]] = {}
    for obs in fhir.search_all("Observation", {"_count": 500}):
        ref = obs.get("derivedFrom", [{}])[0].get("reference", "")
        image = study_image.get(ref.split("/")[1] if "/" in ref else "")
        if image is None:
            continue
        band: dict[str, Any] = next(
            (e["valueRange"] for e in obs.get("extension", []) if "valueRange" in e), {}
        )
        numbers = (
            float(obs["valueQuantity"]["value"]),
            float(band.get("low", {}).get("value", "nan")),
            float(band.get("high", {}).get("value", "nan")),
            *(float(c["valueQuantity"]["value"]) for c in obs.get("component", [])),
        )
        code = json.dumps(obs["code"], sort_keys=True)
        found.setdefault(image, []).append((code, numbers))
    return {image: tuple(sorted(obs)) for image, obs in found.items()}


def compare(a: dict[str, Fingerprint], b: dict[str, Fingerprint]) -> str:
    common = sorted(set(a) & set(b))
    same = sum(1 for k in common if a[k] == b[k])
    diff = 0.0
    for k in common:
        for (code_a, xs), (code_b, ys) in zip(a[k], b[k], strict=False):
            if code_a == code_b:
                diff = max([diff, *(abs(x - y) for x, y in zip(xs, ys, strict=False))])
    only = len(set(a) ^ set(b))
    return (
        f"{same}/{len(common)} images with identical Observation numbers in both paths "
        f"(max |difference| {diff:.3g}; {only} image(s) reported by one path only)"
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=None, help="first N rows of the sample (default: all, 56)"
    )
    parser.add_argument(
        "--batch-size",
        "--inference-batch-size",
        dest="batch_size",
        type=int,
        default=None,
        help="images per model pass of the bulk path (default CXR_INGEST_INFERENCE_BATCH_SIZE, 8)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="cxr workers on the subscription path"
    )
    parser.add_argument("--bulk-first", action="store_true", help="run the bulk path first")
    add_stack_arguments(
        parser,
        REPO / ".cxr-data" / "bench-bulk",
        hapi_port=18680,
        pg_port=15880,
        service_port=18601,
        keep_help="leave the last stack running",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    settings = stack_settings(
        args.data_dir,
        hapi_port=args.hapi_port,
        pg_port=args.pg_port,
        service_port=args.service_port,
        ingest_state_dir=None,
    )
    if args.batch_size is None:
        args.batch_size = settings.ingest_inference_batch_size
    bench = Bench(settings, args)
    t_start = time.monotonic()
    print("bulk inference benchmark: `cxr ingest nih --bulk-inference` vs the subscription path")
    print(f"load average at start: {load()}")
    print(
        "UNTRAINED weights (CXR_MODEL_WEIGHTS=untrained, CLIP untrained): pretrained weights "
        "cannot be downloaded here;\n  timings are those of the real architectures, the scores "
        "are not findings."
    )
    print(
        f"images: the first {bench.n} rows of {bench.manifest} with their PNGs; ingest batch "
        f"{settings.ingest_batch_size}, concurrency {settings.ingest_concurrency}; model version "
        f"{model_version_for(settings)}"
    )
    paths = [bench.subscription, bench.bulk]
    if args.bulk_first:
        paths.reverse()
    results: dict[str, PathResult] = {}
    try:
        for run in paths:
            print(f"\n== {run.__name__} path", flush=True)
            r = run()
            results[run.__name__] = r
            print(
                f"  {r.images} images: ingest returned after {r.ingest_s:.1f} s, all reports "
                f"after {r.wall_s:.1f} s ({r.rate:.2f} images/s)"
            )
            work = ", ".join(f"{n} {kind}" for kind, n in r.work.items())
            print(f"  in HAPI / PostgreSQL (incl. warm-up): {work}; queued jobs {r.jobs}")
            if r.inference:
                print(f"  bulk outcomes: {r.inference}")
    finally:
        if not args.keep:
            bench.teardown()

    sub, blk = results["subscription"], results["bulk"]
    print()
    print(f"{'':<38} {'images':>6} {'wall s':>7} {'images/s':>9}")
    for r in (sub, blk):
        print(f"  {r.label:<36} {r.images:>6} {r.wall_s:>7.1f} {r.rate:>9.2f}")
    ratio = blk.rate / sub.rate if sub.rate else float("nan")
    print(
        f"bulk / subscription speed: {ratio:.2f}x (batch size {args.batch_size}, "
        f"{args.workers} worker(s); untrained weights)"
    )
    print(compare(sub.results, blk.results))
    print(f"load average at end: {load()}; benchmark wall time {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
