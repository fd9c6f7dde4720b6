"""``cxr status``, the stuck sweep and ``/metrics`` against the session's real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fhir_service.ops.stack import settings_env, start_workers, worker_process
from subscriptions.reconcile import MEDIA_WATERMARK, WATERMARK, write_watermark
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration


def _status(stack: Stack, since: datetime, **env: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhir_service.cli",
            "status",
            "--json",
            "--since",
            since.isoformat(),
        ],
        env={**os.environ, **settings_env(stack.settings), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _indexed(stack: Stack, study_id: str) -> bool:
    with psycopg.connect(stack.dsn) as conn:
        row = conn.execute("SELECT 1 FROM study_embeddings WHERE study_id = %s", (study_id,))
        return row.fetchone() is not None


def _metrics(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{stack.settings.service_url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_status_counts_states_and_stuck_studies_are_found_and_queued_again(stack: Stack) -> None:
    wait_for("the queue to drain", stack.drained, timeout_s=240)
    since = datetime.now(UTC) - timedelta(seconds=1)
    good = stack.post_study(50)
    bad = stack.post_study(51, image=b"\x89PNG\r\n\x1a\nnot really a png")
    bare = stack.post_study(52, image=None)
    wait_for("the report", lambda: stack.reports(good))
    wait_for("the failed Task", lambda: (t := stack.task(bad)) and t["status"] == "failed")
    wait_for("the waiting Task", lambda: (t := stack.task(bare)) and t["status"] == "on-hold")
    code, census = _status(stack, since)
    assert code == 0, census
    assert census["states"] == {"reported": 1, "failed": 1, "waiting for images": 1}, census
    assert census["failed_by_reason"] == {"undecodable-image": 1}
    assert census["stuck"] == [] and census["live_workers"] >= 1

    # A study whose job was lost after the sweep had passed it: only the stuck sweep finds it.
    worker_process(stack.settings, 0).stop()
    lost = stack.post_study(53)
    wait_for("its job", lambda: [j for j in stack.jobs() if j[2] == lost])
    time.sleep(5)  # its image's notification too
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM procrastinate_jobs WHERE args->>'study_id' = %s", (lost,))
        # and a report whose job stopped before its embeddings reached the index
        conn.execute("DELETE FROM study_embeddings WHERE study_id = %s", (good,))
    time.sleep(3)
    for name in (WATERMARK, MEDIA_WATERMARK):
        write_watermark(stack.dsn, datetime.now(UTC), name)
    code, census = _status(stack, since, CXR_STUCK_AFTER="2")
    assert code == 3, census
    stuck = {s["study"]: s["why"] for s in census["stuck"]}
    assert "no report, no Task and no job" in stuck[f"ImagingStudy/{lost}"], stuck
    assert stuck[f"ImagingStudy/{good}"] == "reported, but not in the similar-case index", stuck
    start_workers(stack.settings, 1)
    # the worker's stuck sweep runs every minute with the session's 60 s bound
    wait_for("the stuck study's report", lambda: stack.reports(lost), timeout_s=300)
    wait_for("the embeddings back in the index", lambda: _indexed(stack, good), timeout_s=120)
    assert len(stack.reports(good)) == 1
    wait_for("the waiting study to fail", lambda: stack.task(bare)["status"] == "failed")
    wait_for("the queue to drain", stack.drained, timeout_s=120)
    code, census = _status(stack, since)
    assert code == 0, census
    assert census["states"] == {"reported": 2, "failed": 2}, census
    assert census["failed_by_reason"] == {"undecodable-image": 1, "no-pixels": 1}

    metrics = _metrics(stack)

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("cxr_notifications_received_total", resource="ImagingStudy", outcome="queued") >= 3
    media = sum(v for (name, labels), v in metrics.items() if ("resource", "Media") in labels
                and name == "cxr_notifications_received_total")  # fmt: skip
    assert media >= 3
    assert value("cxr_jobs_succeeded_total", outcome="reported") >= 2
    assert value("cxr_jobs_failed_total", reason="undecodable-image") >= 1
    assert value("cxr_jobs_failed_total", reason="no-pixels") >= 1
    assert value("cxr_jobs_queued_total", source="stuck-sweep") >= 1
    assert value("cxr_post_to_report_seconds_count") >= 2
    assert value("cxr_model_pass_seconds_count") >= 2
    assert ("cxr_queue_depth", ()) in metrics
    assert value("cxr_queue_jobs", status="succeeded") >= 2
