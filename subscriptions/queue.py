"""The durable job queue (procrastinate on PostgreSQL).

Keys, written down once:

* one waiting job per study, whatever version a notification names: the *queueing lock*
  ``queued:study:{id}`` makes any further defer a no-op while one job for the study is still
  waiting, so 20 duplicate rest-hook deliveries (or 200 that differ only in
  ``meta.versionId``) queue one job. That is safe because the job reads the study as it is
  when it runs, not the version that queued it; a notification that arrives once the job
  has started queues the next one;
* one job at a time per study: the *lock* ``study:{id}`` serialises jobs for the same study
  across any number of workers, so two versions never race their writes;
* the FHIR writes themselves are conditional creates on the report identifier, so a job
  that runs twice (worker killed after writing, before acknowledging) changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import procrastinate
from procrastinate.exceptions import AlreadyEnqueued, UniqueViolation
from procrastinate.jobs import JobDeferrer, Status

from subscriptions.failures import DEFAULT_RETRY, TRANSIENT

log = logging.getLogger(__name__)

__all__ = ["RETRY", "TRANSIENT"]

QUEUE = "studies"
PROCESS_TASK = "cxr.process_study"
RECONCILE_TASK = "cxr.reconcile"
STALLED_TASK = "cxr.retry_stalled"
STUCK_TASK = "cxr.requeue_stuck"

#: One retry policy for every job (subscriptions.failures): bad input is never retried,
#: transient errors long enough to outlast a restart, unknown ones a couple of times.
RETRY = DEFAULT_RETRY

#: What a periodic sweep gets: a function that queues (study id, version id).
Enqueue = Callable[[str, str], bool]


def make_app(dsn: str) -> procrastinate.App:
    """A procrastinate app on ``dsn``, with no task registered.

    Deferring needs none (jobs are deferred by task name, see :func:`enqueue_study`); the
    worker registers the implementations with :func:`register_tasks`.
    """
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))


def apply_schema(dsn: str) -> None:
    """Create procrastinate's tables once; safe when several processes start together."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('cxr.procrastinate.schema'))")
        try:
            exists = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
            if not (exists and exists[0]):
                conn.execute(procrastinate.schema.SchemaManager.get_schema())
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext('cxr.procrastinate.schema'))")


def study_queueing_lock(study_id: str) -> str:
    """One waiting job per study: the job processes whatever version is current then."""
    return f"queued:study:{study_id}"


def study_queued(dsn: str, study_id: str) -> bool:
    """Whether a job for the study waits in the queue (its queueing lock is taken)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT 1 FROM procrastinate_jobs WHERE queueing_lock = %s AND status = 'todo'",
            (study_queueing_lock(study_id),),
        ).fetchone()
    return row is not None


def study_lock(study_id: str) -> str:
    return f"study:{study_id}"


def register_tasks(
    app: procrastinate.App,
    process: Callable[[int, str, str], Any],
    reconcile: Callable[[Enqueue], Any] | None = None,
    *,
    reconcile_cron: str = "* * * * * */30",
    requeue_stuck: Callable[[Enqueue], Any] | None = None,
    stuck_cron: str = "*/2 * * * * 0",
    queued_again: Callable[[str], bool] | None = None,
) -> None:
    """Register the worker-side implementations on ``app``.

    ``process(attempts, study_id, version_id)`` gets the number of earlier runs of the job
    (the retry policy decides from it whether this run is the last). The periodic
    ``reconcile(enqueue)`` and ``requeue_stuck(enqueue)`` run in a thread beside the study
    jobs (:func:`_beside_the_jobs`);
    ``enqueue(study_id, version_id)`` queues through the worker's own (async) connection,
    since a sync defer is not allowed inside a worker. Crons have a sixth field for seconds
    (croniter puts it last).

    With ``queued_again(study_id)`` (:func:`study_queued`), a job that fails in a way the
    policy would retry is not retried when the study has been queued again meanwhile:
    procrastinate's retry would put a second waiting job under the study's queueing lock,
    the database refuses that, and the job was left 'doing' for ever, holding the study
    lock that its duplicate waits for (found by the HAPI-restart fault drill). The queued
    job redoes the work, with its own retries.
    """

    def _process(context: procrastinate.JobContext, study_id: str, version_id: str) -> Any:
        job = context.job
        attempts = job.attempts if job else 0
        try:
            return process(attempts, study_id, version_id)
        except Exception as exc:
            retried = job is not None and RETRY.get_retry_decision(exception=exc, job=job)
            if retried and queued_again is not None and queued_again(study_id):
                log.warning(
                    "ImagingStudy/%s: not retried (%s): it is queued again, that job redoes it",
                    study_id,
                    exc,
                )
                return "superseded by a queued duplicate"
            raise

    app.task(name=PROCESS_TASK, queue=QUEUE, retry=RETRY, pass_context=True)(_process)
    for name, fn, cron, periodic_id in (
        (RECONCILE_TASK, reconcile, reconcile_cron, "sweep"),
        (STUCK_TASK, requeue_stuck, stuck_cron, "stuck"),
    ):
        if fn is not None:
            app.periodic(cron=cron, periodic_id=periodic_id)(
                app.task(name=name, queue=QUEUE, queueing_lock=periodic_id)(
                    _beside_the_jobs(app, name, fn)
                )
            )

    async def _retry_stalled(timestamp: int) -> None:
        # A worker killed mid-job (SIGKILL, OOM, power) leaves its job 'doing' forever and,
        # because of the per-study lock, blocks that study. Heartbeats tell us it is dead.
        stalled = await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=30)
        for job in stalled:
            try:
                await app.job_manager.retry_job(job)
                log.warning("retrying stalled job %s (%s)", job.id, job.task_name)
            except UniqueViolation:
                # The study was queued again meanwhile; that job does the work (on the then
                # current version) once this one releases the study lock.
                await app.job_manager.finish_job(job, Status.ABORTED, delete_job=False)
                log.warning("stalled job %s superseded by a queued duplicate", job.id)

    app.periodic(cron="* * * * * */15", periodic_id="stalled")(
        app.task(name=STALLED_TASK, queue=QUEUE, queueing_lock="stalled")(_retry_stalled)
    )


_SWEEPS: dict[str, asyncio.Task[None]] = {}
"""the sweep of each periodic task started in this process and not yet finished, by name"""


def _beside_the_jobs(
    app: procrastinate.App, name: str, fn: Callable[[Enqueue], Any]
) -> Callable[[int], Coroutine[Any, Any, None]]:
    """A periodic task that starts ``fn(enqueue)`` in a thread and returns at once.

    The sweep runs beside the study jobs instead of in the worker's job slot: with one slot,
    a study posted during a sweep (1–2 s of HAPI searches) waited for it, which is what
    bench/pipeline.py's queue-wait p95 showed. One run per process at a time: a run still
    going when the next is due skips that one. Failures are logged (the task has already
    succeeded); :func:`finish_sweeps` waits for running sweeps when the worker stops.
    ``enqueue(study_id, version_id)`` queues through the worker's own (async) connection.
    """

    async def periodic(timestamp: int) -> None:
        if name in _SWEEPS:
            log.info("%s: the previous run is still going; this one is skipped", name)
            return
        loop = asyncio.get_running_loop()

        def enqueue(study_id: str, version_id: str) -> bool:
            future = asyncio.run_coroutine_threadsafe(
                enqueue_study(app, study_id, version_id), loop
            )
            return future.result(timeout=60)

        task = asyncio.create_task(_logged(name, asyncio.to_thread(fn, enqueue)))
        _SWEEPS[name] = task
        task.add_done_callback(lambda _: _SWEEPS.pop(name, None))

    return periodic


async def _logged(name: str, sweep: Awaitable[Any]) -> None:
    try:
        await sweep
    except Exception:
        log.exception("%s failed; the next run tries again", name)


async def finish_sweeps(timeout_s: float = 60.0) -> None:
    """Let the sweeps this process started finish (a stopping worker, before the connection
    they queue through closes); one still running after ``timeout_s`` is left behind."""
    if _SWEEPS:
        log.info("waiting for %d running sweep(s) to finish", len(_SWEEPS))
        _, pending = await asyncio.wait(set(_SWEEPS.values()), timeout=timeout_s)
        if pending:
            log.warning(
                "%d sweep(s) still running after %.0f s; stopping anyway", len(pending), timeout_s
            )


def _study_job(app: procrastinate.App, study_id: str, version_id: str) -> JobDeferrer:
    return app.configure_task(
        PROCESS_TASK,
        queue=QUEUE,
        lock=study_lock(study_id),
        queueing_lock=study_queueing_lock(study_id),
    )


async def enqueue_study(app: procrastinate.App, study_id: str, version_id: str) -> bool:
    """Queue processing of the study (``version_id`` is what the notification named, kept
    for the logs); False when a job for the study is already waiting."""
    try:
        await _study_job(app, study_id, version_id).defer_async(
            study_id=study_id, version_id=version_id
        )
    except AlreadyEnqueued:
        return False
    return True


def enqueue_study_sync(app: procrastinate.App, study_id: str, version_id: str) -> bool:
    """Synchronous :func:`enqueue_study` for the CLI (not inside a worker: see register_tasks)."""
    try:
        _study_job(app, study_id, version_id).defer(study_id=study_id, version_id=version_id)
    except AlreadyEnqueued:
        return False
    return True
