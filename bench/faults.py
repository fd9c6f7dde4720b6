"""The fault matrix at a larger batch, and a burst of studies posted at once.

Same drills as ``tests/integration/test_faults.py`` (:mod:`fhir_service.ops.faults`), on this
script's own stack with two ``cxr worker`` processes: worker SIGKILL mid-job; ``cxr serve``
down while a batch is posted (long enough for HAPI to drop its deliveries); both
Subscriptions off for a batch, then on; PostgreSQL restarted mid-batch; HAPI restarted
mid-batch; 20 duplicate notifications for one study. Each prints what HAPI holds afterwards:
posted, reported, lost, duplicate reports / Observations / heatmap Media, and how many jobs
the sweeps queued (what the rest-hook never delivered).

Then the **burst**: ``--burst`` studies posted at once (8 concurrent POSTs) with 2 workers:
time to the last report, peak queue depth, per-study POST → report p50 / p95 (study
``meta.lastUpdated`` → report ``meta.lastUpdated``, both HAPI's clock).

Prints, never asserts. Untrained models (pretrained weights cannot be downloaded here). Own
data dir and ports (``.cxr-data/bench-faults``, HAPI 18980, PostgreSQL 15980, service 18901),
wiped at start except the exported ONNX models.

    .venv/bin/python bench/faults.py                      # batches of 20, burst of 200
    .venv/bin/python bench/faults.py --batch 5 --burst 40  # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

from bench._common import add_stack_arguments, load, stack_settings, wait_for, wipe_stack_state  # noqa: E402
from fhir_service.ops import hapi_server  # noqa: E402
from fhir_service.ops.database import start_database, stop_database  # noqa: E402
from fhir_service.ops.faults import Drill, Tally  # noqa: E402
from fhir_service.ops.stack import start_service, start_workers, stop_all  # noqa: E402


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=20, help="studies per fault drill")
    parser.add_argument("--burst", type=int, default=200, help="studies posted at once")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-matrix", action="store_true", help="the burst only")
    add_stack_arguments(
        parser,
        REPO / ".cxr-data" / "bench-faults",
        hapi_port=18980,
        pg_port=15980,
        service_port=18901,
    )
    return parser.parse_args(argv)


def _workers_alive(drill: Drill) -> int:
    import psycopg

    with psycopg.connect(drill.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM procrastinate_workers "
            "WHERE last_heartbeat > now() - interval '30 seconds'"
        ).fetchone()
    return int(row[0]) if row else 0


def _matrix(drill: Drill, batch: int) -> list[Tally]:
    tallies = []
    for run in (
        lambda: drill.worker_killed(batch),
        lambda: drill.duplicate_notifications(20),
        lambda: drill.service_down(batch),
        lambda: drill.subscription_off(batch),
        lambda: drill.postgres_restarted(batch),
        lambda: drill.hapi_restarted(batch),
    ):
        tally = run()
        print(f"  {tally.line()}", flush=True)
        tallies.append(tally)
    return tallies


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    settings = stack_settings(
        args.data_dir,
        hapi_port=args.hapi_port,
        pg_port=args.pg_port,
        service_port=args.service_port,
        image_wait=timedelta(minutes=15),
    )
    t_start = time.monotonic()
    print("fault matrix + burst: every study reported exactly once, counted in HAPI")
    print(f"load average at start: {load()}")
    print("UNTRAINED weights (pretrained weights cannot be downloaded here): real architectures")
    stop_all(settings)
    hapi_server.stop(settings)
    stop_database(settings)
    wipe_stack_state(settings)
    try:
        boot = hapi_server.start(settings, progress=lambda _m: None)
        start_database(settings)
        start_service(settings)
        start_workers(settings, args.workers)
        drill = Drill(settings, timeout_s=1800)
        wait_for("the workers", lambda: _workers_alive(drill) >= args.workers, 600, 0.5)
        print(
            f"stack: HAPI {settings.fhir_base_url} (H2, boot {boot:.0f} s), {args.workers} "
            f"workers, model {drill.model_version}"
        )
        warm = drill.post(args.workers, "warm-up")
        drill.wait_reported(warm)
        print(f"warm-up: {len(warm)} studies reported")
        tallies: list[Tally] = []
        if not args.skip_matrix:
            print(f"\nfault matrix, {args.batch} studies per drill:")
            tallies = _matrix(drill, args.batch)
        print(f"\nburst: {args.burst} studies posted at once, {args.workers} workers")
        burst = drill.burst(args.burst)
        tally: Tally = burst["tally"]
        print(f"  {tally.line()}")
        print(
            f"  all posted in {burst['posted_s']:.1f} s; last report after "
            f"{burst['last_report_s']:.1f} s ({args.burst / burst['last_report_s'] * 60:.1f} "
            f"studies/min); peak queue depth {burst['peak_queue_depth']}; per study POST → "
            f"report p50 {burst['p50_s']:.1f} s, p95 {burst['p95_s']:.1f} s"
        )
        bad = [t for t in [*tallies, tally] if not t.ok]
        print(f"\n{len(bad)} drills with a lost or duplicated study")
        print(f"load average at end: {load()}; wall time {time.monotonic() - t_start:.0f} s")
        drill.close()
    finally:
        if not args.keep:
            stop_all(settings)
            hapi_server.stop(settings)
            stop_database(settings)


if __name__ == "__main__":
    main()
