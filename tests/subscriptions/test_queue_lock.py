"""One waiting job per study, whatever version a notification names (procrastinate's
in-memory connector, which enforces queueing locks as PostgreSQL's unique index does).

Issue 13 sent 200 notifications of one study that differed only in ``meta.versionId``, and
each ran a full job. The job reads the study as it is when it runs, so one waiting job
covers them all.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import procrastinate
import pytest
from procrastinate.testing import InMemoryConnector

from cxr_errors import FhirUnavailableError, InputError
from subscriptions.queue import PROCESS_TASK, enqueue_study, register_tasks


def _app() -> tuple[procrastinate.App, InMemoryConnector]:
    connector = InMemoryConnector()
    app = procrastinate.App(connector=connector)
    register_tasks(app, lambda final, study_id, version_id: "done")
    return app, connector


def _queued(connector: InMemoryConnector, study_id: str) -> list[dict[str, object]]:
    return [
        job
        for job in connector.jobs.values()
        if job["task_name"] == PROCESS_TASK and job["args"]["study_id"] == study_id
    ]


def test_notifications_that_differ_only_in_version_queue_one_job() -> None:
    app, connector = _app()

    async def notify() -> list[bool]:
        async with app.open_async():
            return [await enqueue_study(app, "s1", str(version)) for version in range(1, 201)]

    queued = asyncio.run(notify())
    assert queued[0] is True and queued[1:] == [False] * 199
    assert len(_queued(connector, "s1")) == 1


def test_other_studies_queue_their_own_job_and_a_started_job_lets_the_next_queue() -> None:
    app, connector = _app()

    async def run() -> list[bool]:
        async with app.open_async():
            first = await enqueue_study(app, "s1", "1")
            other = await enqueue_study(app, "s2", "1")
            (job,) = _queued(connector, "s1")
            job["status"] = "doing"  # a worker took it: a newer version must queue again
            again = await enqueue_study(app, "s1", "2")
            return [first, other, again]

    assert asyncio.run(run()) == [True, True, True]
    assert len(_queued(connector, "s1")) == 2


def _process_task(queued: bool, error: Exception) -> tuple[Any, list[str]]:
    asked: list[str] = []

    def process(attempts: int, study_id: str, version_id: str) -> str:
        raise error

    def queued_again(study_id: str) -> bool:
        asked.append(study_id)
        return queued

    app = procrastinate.App(connector=InMemoryConnector())
    register_tasks(app, process, queued_again=queued_again)
    return app.tasks[PROCESS_TASK].func, asked


def test_a_failed_job_is_not_retried_when_its_study_is_queued_again() -> None:
    """The HAPI-restart drill: a transient failure whose retry would collide with the
    study's queued duplicate (unique queueing lock) left the job 'doing' for ever."""
    context = SimpleNamespace(job=SimpleNamespace(attempts=0))
    run, asked = _process_task(True, FhirUnavailableError("HAPI restarting"))
    assert run(context, "s1", "1") == "superseded by a queued duplicate"
    assert asked == ["s1"]
    run, _ = _process_task(False, FhirUnavailableError("HAPI restarting"))
    with pytest.raises(FhirUnavailableError):  # nothing queued: procrastinate retries it
        run(context, "s1", "1")
    run, asked = _process_task(True, InputError("not an image"))
    with pytest.raises(InputError):  # never retried anyway: failed Task, no question asked
        run(context, "s1", "1")
    assert asked == []


def test_a_sweep_runs_beside_the_study_jobs_and_a_stopping_worker_waits_for_it() -> None:
    """The periodic sweep returns at once (a study posted meanwhile does not wait behind it
    for the worker's one job slot); the next period skips while it still runs; what it
    queues lands; the worker's stop waits for it."""
    import threading
    import time

    from subscriptions.queue import RECONCILE_TASK, finish_sweeps

    release, calls = threading.Event(), []

    def reconcile(enqueue: Any) -> None:
        calls.append(time.monotonic())
        assert release.wait(10)
        assert enqueue("s-swept", "sweep")

    connector = InMemoryConnector()
    app = procrastinate.App(connector=connector)
    register_tasks(app, lambda final, study_id, version_id: "done", reconcile)
    periodic = app.tasks[RECONCILE_TASK].func

    async def scenario() -> None:
        async with app.open_async():
            started = time.monotonic()
            await periodic(1)
            assert time.monotonic() - started < 1.0, "the task waited for the sweep"
            await asyncio.sleep(0.2)
            await periodic(2)  # the first still runs: skipped
            assert len(calls) == 1
            release.set()
            await finish_sweeps(timeout_s=10)
            assert _queued(connector, "s-swept")

    asyncio.run(scenario())
