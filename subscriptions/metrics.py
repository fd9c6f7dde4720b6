"""Prometheus metrics of the receiver and the workers, served together by ``cxr serve``.

Workers run as separate processes, on any number of machines, so their counters cannot live
in the service's memory. Each worker keeps its own registry (:class:`JobMetrics`) and
publishes a snapshot of it to PostgreSQL (:class:`SnapshotPublisher`: after every job and every
few seconds; one row per worker process). The service's ``/metrics`` merges its own registry
with every worker's latest snapshot (:class:`MergedCollector`: counters and histograms summed
over all worker processes that ever ran, gauges over the live ones) and adds the queue depth,
read from the queue table at scrape time (:class:`QueueCollector`).

Rows of finished worker processes stay, so the summed counters never go backwards when a
worker restarts; rows older than a week are pruned.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

__all__ = [
    "JOB_STAGES",
    "JobMetrics",
    "MergedCollector",
    "QueueCollector",
    "ServiceMetrics",
    "SnapshotPublisher",
    "families_of",
]

#: A gauge from a worker that has not published for this long is from a dead process.
LIVE_WITHIN = timedelta(seconds=60)
PRUNE_AFTER = timedelta(days=7)

#: The stages of a study job, in order (``cxr_job_stage_seconds{stage}``): the study read,
#: the pixels, "already reported?", the model's own (decode … overlays), the earlier reports
#: and Task, the SR/SEG for the PACS, the result transaction, the embedding upsert.
JOB_STAGES = (
    "study",
    "pixels",
    "dedup",
    "decode",
    "densenet",
    "clip",
    "overlays",
    "lookups",
    "pacs-results",
    "transaction",
    "embedding",
)

_LATENCY_BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300, 600, 900, 1800, 3600)
_MODEL_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)

_DDL = """
CREATE TABLE IF NOT EXISTS cxr_metric_snapshots (
    process text PRIMARY KEY,
    updated_at timestamptz NOT NULL DEFAULT now(),
    families jsonb NOT NULL
)
"""


class ServiceMetrics:
    """What the rest-hook receiver counts (the service process's own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.notifications = Counter(
            "cxr_notifications_received",
            "Rest-hook notifications received, by resource type and what was done with them",
            ["resource", "outcome"],
            registry=self.registry,
        )
        self.queued = Counter(
            "cxr_jobs_queued",
            "Study jobs queued, by who queued them (hook, sweep, stuck-sweep, reconcile)",
            ["source"],
            registry=self.registry,
        )

    def notified(self, resource: str, outcome: str, queued: int | None = None) -> None:
        """One notification handled: ``queued`` (or ``duplicate``: already waiting),
        ``ignored``; ``queued`` jobs (default: 1 when the outcome is ``queued``)."""
        self.notifications.labels(resource=resource, outcome=outcome).inc()
        n = (1 if outcome == "queued" else 0) if queued is None else queued
        if n:
            self.queued.labels(source="hook").inc(n)

    @contextmanager
    def rejections(self, resource: str) -> Iterator[None]:
        """Counts a notification refused inside the block (bad secret, body or resource)."""
        try:
            yield
        except Exception:
            self.notifications.labels(resource=resource, outcome="rejected").inc()
            raise


class JobMetrics:
    """What a worker counts: jobs by outcome, retries, latencies (the worker's registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.started = Counter("cxr_jobs_started", "Study job runs started", registry=r)
        self.running = Gauge("cxr_jobs_running", "Study jobs running now", registry=r)
        self.succeeded = Counter(
            "cxr_jobs_succeeded",
            "Study jobs that ended well, by outcome (reported, already-reported, waiting, "
            "withdrawn, skipped)",
            ["outcome"],
            registry=r,
        )
        self.failed = Counter(
            "cxr_jobs_failed",
            "Study jobs that ended in a failed Task, by reason (the Task's businessStatus)",
            ["reason"],
            registry=r,
        )
        self.retried = Counter(
            "cxr_jobs_retried",
            "Study job runs that raised and will be retried, by kind of failure",
            ["kind"],
            registry=r,
        )
        self.queued = Counter(
            "cxr_jobs_queued",
            "Study jobs queued, by who queued them (hook, sweep, stuck-sweep, reconcile)",
            ["source"],
            registry=r,
        )
        self.post_to_report = Histogram(
            "cxr_post_to_report_seconds",
            "From the study's (or its late image's) last update in FHIR to its report committed",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_pass = Histogram(
            "cxr_model_pass_seconds",
            "One study's model pass (DenseNet scores + CAMs, CLIP, heatmaps)",
            buckets=_MODEL_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "cxr_job_stage_seconds",
            "One stage of a study job: " + ", ".join(JOB_STAGES),
            ["stage"],
            buckets=_MODEL_BUCKETS,
            registry=r,
        )


def families_of(registry: CollectorRegistry) -> list[dict[str, Any]]:
    """A registry's metric families as JSON-able dicts (``_created`` timestamps left out:
    they cannot be summed)."""
    out = []
    for family in registry.collect():
        samples = [
            [s.name, s.labels, s.value] for s in family.samples if not s.name.endswith("_created")
        ]
        out.append(
            {
                "name": family.name,
                "type": family.type,
                "doc": family.documentation,
                "unit": family.unit,
                "samples": samples,
            }
        )
    return out


class SnapshotPublisher:
    """Writes a worker's metric families to PostgreSQL, now and every ``interval_s``."""

    def __init__(self, dsn: str, registry: CollectorRegistry, *, interval_s: float = 10.0) -> None:
        self.dsn = dsn
        self.registry = registry
        self.interval_s = interval_s
        self.process = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def publish(self) -> bool:
        """One snapshot; False (and a debug line) when the database is unreachable."""
        payload = json.dumps(families_of(self.registry))
        try:
            with self._lock, psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as c:
                c.execute(_DDL)
                c.execute(
                    "INSERT INTO cxr_metric_snapshots (process, families) VALUES (%s, %s) "
                    "ON CONFLICT (process) DO UPDATE SET families = EXCLUDED.families, "
                    "updated_at = now()",
                    (self.process, payload),
                )
                c.execute(
                    "DELETE FROM cxr_metric_snapshots WHERE updated_at < now() - %s",
                    (PRUNE_AFTER,),
                )
        except psycopg.Error as exc:
            log.debug("metrics snapshot not written: %s", exc)
            return False
        return True

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.publish()

        self.publish()
        self._thread = threading.Thread(target=loop, name="metrics-snapshots", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.publish()


def read_snapshots(dsn: str) -> list[tuple[bool, list[dict[str, Any]]]]:
    """(live, families) of every worker process that published."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        conn.execute(_DDL)
        rows = conn.execute(
            "SELECT updated_at > now() - %s, families FROM cxr_metric_snapshots",
            (LIVE_WITHIN,),
        ).fetchall()
    return [(bool(live), list(families)) for live, families in rows]


class MergedCollector(Collector):
    """The service's own registry plus every worker's snapshot, summed family by family."""

    def __init__(self, dsn: str, local: CollectorRegistry) -> None:
        self.dsn = dsn
        self.local = local

    def collect(self) -> Iterable[Metric]:
        sources: list[tuple[bool, list[dict[str, Any]]]] = [(True, families_of(self.local))]
        try:
            sources += read_snapshots(self.dsn)
        except psycopg.Error as exc:
            log.warning("worker metrics unavailable: %s", exc)
        return _merge(sources)


def _merge(sources: list[tuple[bool, list[dict[str, Any]]]]) -> Iterator[Metric]:
    heads: dict[str, dict[str, Any]] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for live, families in sources:
        for fam in families:
            if fam["type"] == "gauge" and not live:
                continue
            heads.setdefault(fam["name"], fam)
            totals = sums.setdefault(fam["name"], {})
            for name, labels, value in fam["samples"]:
                key = (name, tuple(sorted(labels.items())))
                totals[key] = totals.get(key, 0.0) + float(value)
    for name, head in heads.items():
        metric = Metric(name, head["doc"], head["type"], head.get("unit") or "")
        for (sample, labels), value in sums[name].items():
            metric.add_sample(sample, dict(labels), value)
        yield metric


class QueueCollector(Collector):
    """Study jobs in the queue by status, read at scrape time (any number of workers)."""

    def __init__(self, dsn: str, task_name: str) -> None:
        self.dsn = dsn
        self.task_name = task_name

    def collect(self) -> Iterable[Metric]:
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=3) as conn:
                rows = conn.execute(
                    "SELECT status::text, count(*) FROM procrastinate_jobs "
                    "WHERE task_name = %s GROUP BY status",
                    (self.task_name,),
                ).fetchall()
        except psycopg.Error as exc:
            log.warning("queue metrics unavailable: %s", exc)
            return []
        counts = {str(status): int(n) for status, n in rows}
        jobs = Metric("cxr_queue_jobs", "Study jobs in the queue table, by status", "gauge")
        for status in ("todo", "doing", "succeeded", "failed", "cancelled", "aborted"):
            jobs.add_sample("cxr_queue_jobs", {"status": status}, counts.get(status, 0))
        depth = Metric("cxr_queue_depth", "Study jobs waiting to run (status todo)", "gauge")
        depth.add_sample("cxr_queue_depth", {}, counts.get("todo", 0))
        return [jobs, depth]
