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
from collections.abc import Callable
from typing import Any

import procrastinate
from procrastinate import RetryStrategy
from procrastinate.exceptions import AlreadyEnqueued, UniqueViolation
from procrastinate.jobs import JobDeferrer, Status

from cxr_errors import FhirUnavailableError, StoreError

log = logging.getLogger(__name__)

QUEUE = "studies"
PROCESS_TASK = "cxr.process_study"
RECONCILE_TASK = "cxr.reconcile"
STALLED_TASK = "cxr.retry_stalled"

#: Transient failures: HAPI 5xx / timeouts, database hiccups. Anything else is final.
TRANSIENT: tuple[type[Exception], ...] = (
    FhirUnavailableError,
    StoreError,
    ConnectionError,
    TimeoutError,
)

RETRY = RetryStrategy(max_attempts=6, exponential_wait=2, retry_exceptions=set(TRANSIENT))


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


def study_lock(study_id: str) -> str:
    return f"study:{study_id}"


def register_tasks(
    app: procrastinate.App,
    process: Callable[[bool, str, str], Any],
    reconcile: Callable[[Callable[[str, str], bool]], Any] | None = None,
    *,
    reconcile_cron: str = "* * * * * */30",
) -> None:
    """Register the worker-side implementations on ``app``.

    ``reconcile(enqueue)`` runs in a thread; ``enqueue(study_id, version_id)`` queues through
    the worker's own (async) connection, since a sync defer is not allowed inside a worker.
    Crons have a sixth field for seconds (croniter puts it last).
    """

    def _process(context: procrastinate.JobContext, study_id: str, version_id: str) -> Any:
        # The last attempt turns a transient failure into a failed Task visible in FHIR.
        attempts = context.job.attempts if context.job else 0
        final = attempts >= (RETRY.max_attempts or 0)
        return process(final, study_id, version_id)

    app.task(name=PROCESS_TASK, queue=QUEUE, retry=RETRY, pass_context=True)(_process)
    if reconcile is not None:

        async def _reconcile(timestamp: int) -> None:
            loop = asyncio.get_running_loop()

            def enqueue(study_id: str, version_id: str) -> bool:
                future = asyncio.run_coroutine_threadsafe(
                    enqueue_study(app, study_id, version_id), loop
                )
                return future.result(timeout=60)

            await asyncio.to_thread(reconcile, enqueue)

        app.periodic(cron=reconcile_cron, periodic_id="sweep")(
            app.task(name=RECONCILE_TASK, queue=QUEUE, queueing_lock="reconcile")(_reconcile)
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
