"""Fault drills: break one part of a running stack while studies flow, then count in HAPI.

Each drill posts real NIH studies (as an integrator would, one transaction each), injects
one fault, waits until every study has a report, and returns a :class:`Tally` of what HAPI
holds: studies posted and reported, lost, and duplicate DiagnosticReports, Observations and
heatmap Media; and, from the similar-case index, the reported studies missing there. The
integration tests run the matrix with small batches (``tests/integration/test_faults.py``);
``bench/faults.py`` runs the same drills larger, plus a burst of studies posted at once.

The stack is the one the settings describe: HAPI, PostgreSQL, ``cxr serve`` and workers
started with :mod:`fhir_service.ops.stack` (their pid files are how the drills find them).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from fhir_service.fhir.client import FhirClient
from fhir_service.fhir.identifiers import study_model_identifier
from fhir_service.fhir.results import is_cxr_overlay
from fhir_service.fhir.terminology import TERMINOLOGY
from fhir_service.ingest.nih import read_manifest
from fhir_service.ingest.transaction import created_id, study_bundle
from fhir_service.ops import hapi_server
from fhir_service.ops.database import database_url, start_database, stop_database
from fhir_service.ops.stack import service_process, start_service, start_workers, worker_process
from fhir_service.runtime import model_version_for
from fhir_service.settings import Settings
from subscriptions.bootstrap import (
    MEDIA_SUBSCRIPTION_ID,
    SECRET_HEADER,
    SUBSCRIPTION_ID,
    ensure_subscriptions,
)
from vector_store.store import indexed_studies

__all__ = ["Drill", "Tally"]

_LIVE = ("preliminary", "final", "amended", "corrected", "appended")
FINDINGS = 14
#: HAPI retries a failed rest-hook delivery for one minute, then drops it.
HAPI_GIVES_UP_S = 65.0


@dataclass(frozen=True)
class Tally:
    """What one drill ended with, counted in HAPI."""

    case: str
    posted: int
    reported: int
    lost: int
    duplicate_reports: int
    duplicate_observations: int
    duplicate_media: int
    seconds: float
    queued_by_sweep: int
    """jobs the sweeps queued during the drill (what the rest-hook did not deliver)"""
    unindexed: int = 0
    """reported studies whose embeddings are not in the similar-case index"""

    @property
    def ok(self) -> bool:
        duplicates = self.duplicate_reports + self.duplicate_observations + self.duplicate_media
        return (
            self.reported == self.posted and not self.lost and not duplicates and not self.unindexed
        )

    def line(self) -> str:
        return (
            f"{self.case}: posted {self.posted}, reported {self.reported}, lost {self.lost}, "
            f"not in the index {self.unindexed}, "
            f"duplicate reports {self.duplicate_reports}, observations "
            f"{self.duplicate_observations}, media {self.duplicate_media}; "
            f"{self.queued_by_sweep} queued by the sweep; {self.seconds:.0f} s"
        )


class Drill:
    def __init__(self, settings: Settings, *, timeout_s: float = 600.0) -> None:
        self.settings = settings
        self.dsn = database_url(settings)
        self.fhir = FhirClient(settings.fhir_base_url, timeout=60)
        self.model_version = model_version_for(settings)
        sample = settings.shared_dir / "data" / "nih-sample"
        self.records = list(read_manifest(sample / "manifest.csv"))
        self._images = {r.image_index: (sample / r.image_index).read_bytes() for r in self.records}
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.fhir.close()

    # --- posting and counting -------------------------------------------------------------

    def post(self, n: int, case: str, *, concurrency: int = 1) -> list[str]:
        """``n`` NIH studies with their images, as distinct studies tagged for this drill."""
        tag = f"{case}-{uuid.uuid4().hex[:8]}"

        def one(i: int) -> str:
            rec = self.records[i % len(self.records)]
            bundle = study_bundle(
                rec, self._images[rec.image_index], tag=f"{tag}-{i}", status="available"
            )
            return created_id(self.fhir.transaction(bundle), "ImagingStudy")

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, range(n)))

    def reports(self, study_id: str) -> list[dict[str, Any]]:
        system, value = study_model_identifier(study_id, self.model_version)
        found = self.fhir.search_all("DiagnosticReport", {"identifier": f"{system}|{value}"})
        return [r for r in found if r.get("status") in _LIVE]

    def reported(self, study_ids: Iterable[str]) -> set[str]:
        return {sid for sid in study_ids if self.reports(sid)}

    def wait_reported(self, study_ids: Sequence[str], *, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        pending = set(study_ids)
        while pending:
            pending -= self.reported(sorted(pending))
            if not pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} studies still without a report: {pending}")
            time.sleep(1.0)
        self.wait_drained(study_ids)

    def wait_drained(self, study_ids: Sequence[str], timeout_s: float = 300.0) -> None:
        """No job left for these studies (so a late duplicate would already be counted)."""
        deadline = time.monotonic() + timeout_s
        while self.jobs(study_ids, ("todo", "doing")) and time.monotonic() < deadline:
            time.sleep(1.0)
        time.sleep(2.0)

    def jobs(self, study_ids: Sequence[str], statuses: Sequence[str]) -> list[tuple[str, str]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT args->>'study_id', status::text FROM procrastinate_jobs "
                "WHERE task_name = 'cxr.process_study' AND status::text = ANY(%s) "
                "AND args->>'study_id' = ANY(%s)",
                (list(statuses), list(study_ids)),
            ).fetchall()
        return [(str(a), str(b)) for a, b in rows]

    def queue_depth(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM procrastinate_jobs "
                "WHERE task_name = 'cxr.process_study' AND status = 'todo'"
            ).fetchone()
        return int(row[0]) if row else 0

    def swept(self) -> float:
        """Jobs queued by the sweeps so far, from the service's /metrics (0 when it is down)."""
        try:
            text = httpx.get(f"{self.settings.service_url}/metrics", timeout=10).text
        except httpx.HTTPError:
            return 0.0
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "cxr_jobs_queued_total" and s.labels.get("source") != "hook":
                    total += s.value
        return total

    def tally(self, case: str, study_ids: Sequence[str], started: float, swept: float) -> Tally:
        obs_system = TERMINOLOGY.identifier_system("observation")
        reported = lost = dup_reports = dup_obs = dup_media = 0
        reported_ids: list[str] = []
        for sid in study_ids:
            reports = self.reports(sid)
            if not reports:
                lost += 1
                continue
            reported += 1
            reported_ids.append(sid)
            dup_reports += len(reports) - 1
            study = f"ImagingStudy/{sid}"
            observations = [
                o
                for o in self.fhir.search_all("Observation", {"derived-from": study})
                if o.get("status") in _LIVE
                and any(i.get("system") == obs_system for i in o.get("identifier", []))
            ]
            dup_obs += max(0, len(observations) - FINDINGS)
            heatmaps = [
                m
                for m in self.fhir.search_all("Media", {"part-of": study})
                if is_cxr_overlay(m) and m.get("status") == "completed"
            ]
            dup_media += max(0, len(heatmaps) - len(reports[0].get("media", [])))
        return Tally(
            case,
            len(study_ids),
            reported,
            lost,
            dup_reports,
            dup_obs,
            dup_media,
            time.monotonic() - started,
            int(max(0.0, self.swept() - swept)),
            unindexed=len(reported_ids) - len(self.indexed(reported_ids)),
        )

    def indexed(self, study_ids: Sequence[str]) -> set[str]:
        """Which of these studies have their row in the similar-case index."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            found = indexed_studies(conn, study_ids, self.model_version)
        return set() if found is None else found

    def _run(self, case: str, n: int, fault: Callable[[list[str]], None]) -> Tally:
        """Post ``n`` studies, inject ``fault`` (given their ids), wait, count."""
        started, swept = time.monotonic(), self.swept()
        ids = self.post(n, case)
        fault(ids)
        self.wait_reported(ids)
        return self.tally(case, ids, started, swept)

    def _wait_running(self, study_ids: Sequence[str], timeout_s: float = 300.0) -> bool:
        """Until a job of these studies is running; False if all were done first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.jobs(study_ids, ("doing",)):
                return True
            if len(self.reported(study_ids)) == len(study_ids):
                return False
            time.sleep(0.2)
        return False

    # --- the drills ------------------------------------------------------------------------

    def worker_killed(self, n: int) -> Tally:
        """SIGKILL the first worker in the middle of a job, then start it again."""

        def fault(ids: list[str]) -> None:
            if not self._wait_running(ids):
                raise AssertionError("every job finished before the worker could be killed")
            proc = worker_process(self.settings, 0)
            pid = proc.pid()
            if pid is None:
                raise AssertionError("no worker-0 running")
            os.killpg(pid, signal.SIGKILL)
            proc.stop()  # clears the pid file of the dead process
            start_workers(self.settings, 1)

        return self._run("worker SIGKILL mid-job", n, fault)

    def service_down(self, n: int, *, down_s: float = HAPI_GIVES_UP_S) -> Tally:
        """Stop ``cxr serve``, post, wait until HAPI has dropped the notifications, start it."""
        started, swept = time.monotonic(), self.swept()
        service_process(self.settings).stop()
        ids = self.post(n, "service-down")
        time.sleep(down_s)
        start_service(self.settings)
        self.wait_reported(ids)
        return self.tally(f"service down during {n} posts", ids, started, swept)

    def hapi_restarted(self, n: int) -> Tally:
        """Restart HAPI while jobs run (its in-memory notification queue is lost with it)."""

        def fault(ids: list[str]) -> None:
            self._wait_running(ids)
            hapi_server.stop(self.settings)
            hapi_server.start(self.settings)

        return self._run("HAPI restarted mid-batch", n, fault)

    def postgres_restarted(self, n: int) -> Tally:
        """Restart PostgreSQL (queue and embeddings) while jobs run."""

        def fault(ids: list[str]) -> None:
            self._wait_running(ids)
            stop_database(self.settings)
            time.sleep(2.0)
            start_database(self.settings)

        return self._run("PostgreSQL restarted mid-batch", n, fault)

    def duplicate_notifications(self, copies: int = 20) -> Tally:
        """The same study's notification delivered ``copies`` more times at once."""

        def fault(ids: list[str]) -> None:
            study = self.fhir.read("ImagingStudy", ids[0])
            hook = f"{self.settings.service_url}/hook/ImagingStudy/{ids[0]}"
            headers = {SECRET_HEADER: self.settings.subscription_secret}

            def send(_: int) -> int:
                return httpx.put(hook, json=study, headers=headers, timeout=30).status_code

            with ThreadPoolExecutor(max_workers=copies) as pool:
                codes = list(pool.map(send, range(copies)))
            if set(codes) != {200}:
                raise AssertionError(f"the hook answered {sorted(set(codes))}")

        return self._run(f"{copies} duplicate notifications", 1, fault)

    def subscription_off(self, n: int, *, off_s: float = 40.0) -> Tally:
        """Both Subscriptions switched off while a batch is posted, then on again after
        ``off_s`` (longer than the sweep's 30 s: what is reported by then was found by it)."""
        started, swept = time.monotonic(), self.swept()
        for sid in (SUBSCRIPTION_ID, MEDIA_SUBSCRIPTION_ID):
            sub = self.fhir.read("Subscription", sid)
            self.fhir.update({**sub, "status": "off"})
        time.sleep(5.0)  # HAPI drops the Subscription from its matcher asynchronously
        ids = self.post(n, "subscription-off")
        time.sleep(off_s)
        ensure_subscriptions(
            self.fhir, f"{self.settings.service_url}/hook", self.settings.subscription_secret
        )
        self.wait_reported(ids)
        return self.tally(f"Subscriptions off for {n} posts", ids, started, swept)

    # --- the burst (bench) -----------------------------------------------------------------

    def burst(self, n: int, *, concurrency: int = 8) -> dict[str, Any]:
        """``n`` studies posted at once: time to the last report, peak queue depth, and the
        per-study POST → report latency (study lastUpdated → report committed)."""
        started = time.monotonic()
        depth = [0]
        done = [False]

        def sample_depth() -> None:
            while not done[0]:
                depth[0] = max(depth[0], self.queue_depth())
                time.sleep(0.5)

        with ThreadPoolExecutor(max_workers=1) as sampler:
            future = sampler.submit(sample_depth)
            ids = self.post(n, "burst", concurrency=concurrency)
            posted_s = time.monotonic() - started
            self.wait_reported(ids, timeout_s=max(self.timeout_s, n * 10.0))
            last_s = time.monotonic() - started
            done[0] = True
            future.result()
        latencies = sorted(self._latency(sid) for sid in ids)
        tally = self.tally(f"burst of {n}", ids, started, 0.0)
        return {
            "tally": tally,
            "posted_s": posted_s,
            "last_report_s": last_s,
            "peak_queue_depth": depth[0],
            "p50_s": latencies[len(latencies) // 2],
            "p95_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))],
        }

    def _latency(self, study_id: str) -> float:
        study = self.fhir.read("ImagingStudy", study_id)
        report = self.reports(study_id)[0]
        return (
            _instant(report["meta"]["lastUpdated"]) - _instant(study["meta"]["lastUpdated"])
        ).total_seconds()


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
