"""Worker metrics reach the service's /metrics: snapshots merged family by family."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from subscriptions.metrics import JobMetrics, ServiceMetrics, _merge, families_of


def test_worker_snapshots_and_the_services_own_counters_merge_into_one_exposition() -> None:
    service = ServiceMetrics()
    service.notified("ImagingStudy", "queued")
    service.notified("Media", "ignored")
    w1, w2, dead = JobMetrics(), JobMetrics(), JobMetrics()
    for worker, seconds in ((w1, 2.5), (w2, 40.0), (dead, 3.0)):
        worker.succeeded.labels(outcome="reported").inc()
        worker.post_to_report.observe(seconds)
        worker.running.set(1)
    w1.failed.labels(reason="no-pixels").inc(2)
    w2.queued.labels(source="sweep").inc(3)
    sources = [
        (True, families_of(service.registry)),
        (True, families_of(w1.registry)),
        (True, families_of(w2.registry)),
        (False, families_of(dead.registry)),  # a worker that stopped publishing
    ]
    registry = CollectorRegistry(auto_describe=False)

    class _Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            return _merge(sources)

    registry.register(_Fixed())  # type: ignore[arg-type]

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    # counters and histograms: every worker that ever ran, dead ones included
    assert value("cxr_jobs_succeeded_total", outcome="reported") == 3
    assert value("cxr_jobs_failed_total", reason="no-pixels") == 2
    assert value("cxr_post_to_report_seconds_count") == 3
    assert value("cxr_post_to_report_seconds_bucket", le="3.0") == 2
    # gauges: only live workers
    assert value("cxr_jobs_running") == 2
    # one family for jobs queued, by the hook (service) and the sweep (worker)
    assert value("cxr_jobs_queued_total", source="hook") == 1
    assert value("cxr_jobs_queued_total", source="sweep") == 3
    assert value("cxr_notifications_received_total", resource="Media", outcome="ignored") == 1
    text = generate_latest(registry).decode()
    assert text.count("# TYPE cxr_jobs_queued_total counter") == 1
    assert "_created" not in text
