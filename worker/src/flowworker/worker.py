"""The worker process: arq's Worker, made to drain, go quiet, wake on events and outlive outages.

What it adds to ``arq.worker.Worker``:

- SIGTERM/SIGINT stop picking jobs and let running ones finish for up to the drain timeout; what
  is left is cancelled and re-queued (arq's ``job_completion_wait``). SIGUSR1 only stops picking
  jobs ("quiet"), so an instance can be drained before it is stopped.
- Idle waiting happens on an event (a queued job, a finished job of ours, or the poll delay)
  rather than on arq's fixed poll timer; see ``wakeup.py``.
- Redis errors in the poll loop and in a job's bookkeeping are logged and retried with back-off
  instead of ending the process; PostgreSQL being unreachable stops job picking until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from arq import Retry, Worker
from arq.constants import abort_jobs_ss, in_progress_key_prefix, retry_key_prefix
from arq.jobs import SerializationError, deserialize_job_raw, serialize_result
from arq.utils import ms_to_datetime, timestamp_ms
from arq.worker import Function, JobExecutionFailed, RetryJob, func

from .batches import RETRY_KEY_TTL, Claimed, Claimer, Ending, Finisher
from .heartbeat import TTL_INTERVALS, Heartbeat, JobCounts, heartbeat_key
from .infrastructure import (
    REDIS_ERRORS,
    REDIS_REFUSALS,
    Infrastructure,
    backoff,
    count_database_reconnects,
    count_redis_reconnects,
    describe_error,
)
from .metrics import WorkerMetrics
from .registry import Registry
from .runner import FlowFailed, Runner, outcome, run_flow
from .schema import check as check_schema
from .store import DATABASE_ERRORS, TaskStore
from .wakeup import QueueWakeup

logger = logging.getLogger('flowworker.worker')

# arq's own job timeout fires only if ours (in run_flow) somehow did not
ARQ_TIMEOUT_GRACE = 5.0
# longest idle wait while keyspace events wake us: a safety net for a missed event
MAX_IDLE_WAIT = 1.0
# the poll waits and tries again: Redis is away, or there and refusing writes for now
REDIS_UNAVAILABLE = (*REDIS_ERRORS, *REDIS_REFUSALS)
_NO_RESULT = object()


@dataclass
class _Job:
    """What a job's run knows of it, for its arq result."""

    job_id: str
    job_try: int
    start_ms: int
    function_name: str = '<unknown>'
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    enqueue_time_ms: int = 0


class FlowWorker(Worker):
    def __init__(
        self,
        *,
        infra: Infrastructure,
        registry: Registry,
        store: TaskStore,
        heartbeat: Heartbeat,
        wakeup: QueueWakeup,
        jobs: JobCounts,
        metrics: WorkerMetrics,
    ) -> None:
        settings = infra.settings
        longest = max([settings.job_timeout, *(f.timeout or 0 for f in registry.flows())])
        super().__init__(
            functions=[
                # one more try than ours, so run_flow is the one that records giving up
                func(
                    run_flow,
                    name='run_flow',
                    timeout=longest + ARQ_TIMEOUT_GRACE,
                    max_tries=settings.max_tries + 1,
                )
            ],
            queue_name=settings.queue_key,
            redis_pool=infra.redis,
            max_jobs=settings.max_jobs,
            job_completion_wait=settings.drain_timeout,  # type: ignore[arg-type]  # arq accepts seconds as float
            poll_delay=0,  # idle waiting is ours, see _idle_wait
            allow_abort_jobs=True,
            log_results=False,
        )
        self.settings = settings
        self.store = store
        self.heartbeat = heartbeat
        self.wakeup = wakeup
        self.draining = False
        # a stop signal has come (see async_run)
        self.stopping = False
        self.metrics = metrics
        self.ctx['runner'] = Runner(
            settings, registry, store, infra.redis, jobs, self.aborting_tasks, metrics
        )
        self.claimer = Claimer(
            infra.redis, settings.queue_key, int(self.in_progress_timeout_s * 1000), self.queue_read_limit
        )
        self.finisher = Finisher(infra.redis, settings.queue_key)
        # the last poll may have left due jobs unclaimed: a slot freed is then a reason to poll
        self._ready_left = True
        self._redis_delays: Iterator[float] | None = None
        self._add_signal_handler(signal.SIGUSR1, self.handle_quiet)

    # --- signals ---------------------------------------------------------------------------------

    def _drain(self, reason: str) -> None:
        if not self.draining:
            logger.info('%s: picking no more jobs', reason, extra={'running': len(self.tasks)})
            self.metrics.drains.inc()
        self.draining = True
        self.allow_pick_jobs = False
        self.heartbeat.drain()
        self.wakeup.event.set()

    def handle_quiet(self, signum: signal.Signals) -> None:
        self._drain(f'{signal.Signals(signum).name} (quiet)')

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        self._drain(f'{signal.Signals(signum).name}: draining for up to {self.settings.drain_timeout:g}s')
        self.stopping = True
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: signal.Signals) -> None:
        self._drain(f'{signal.Signals(signum).name}: stopping now')
        self.stopping = True
        super().handle_sig(signum)

    async def async_run(self) -> None:
        """arq's run, unless a stop (SIGTERM, SIGINT) came while the process was starting: arq's
        handlers then had no main task to cancel, and the worker would run on, draining, until
        killed. No job can run before this, so there is nothing to drain."""
        if not self.stopping:
            await super().async_run()

    # --- the poll loop ---------------------------------------------------------------------------

    async def _poll_iteration(self) -> None:
        """arq's poll in one round trip (see ``batches.py``): claim ready jobs for the free slots and
        start them, cancel the running jobs whose abort was asked, drop the finished tasks; then wait
        until a job may be startable."""
        self.wakeup.event.clear()
        self.allow_pick_jobs = not self.draining and self.store.healthy
        try:
            poll = await self.claimer.poll(self.max_jobs - self.job_counter if self.allow_pick_jobs else 0)
            self._ready_left = poll.ready_left
            for claimed in poll.claimed:
                await self._start(claimed)
            await self._cancel_aborted(poll.aborts)
            for job_id, task in list(self.tasks.items()):
                if task.done():
                    del self.tasks[job_id]
                    task.result()  # an error of ours in a job's run ends the worker, as in arq
            await self.heart_beat()
            await self._idle_wait(poll.next_deferred_ms)
        except REDIS_UNAVAILABLE as e:
            await self._redis_unavailable(e)
            return
        if self._redis_delays is not None:
            logger.warning('Redis is reachable again')
            self._redis_delays = None

    async def _redis_unavailable(self, e: BaseException) -> None:
        self._redis_delays = self._redis_delays or backoff()
        delay = next(self._redis_delays)
        logger.warning('Redis is unreachable, retrying in %.1fs: %s', delay, describe_error(e))
        await asyncio.sleep(delay)

    async def _idle_wait(self, next_deferred_ms: float | None) -> None:
        """Wait until a job may be startable: a queued job, a free slot while the last poll left
        due jobs, a job of ours released to run again, or the next deferred job.

        The jobs already due were just tried: they run (arq keeps a job in its queue until it
        ends), here or elsewhere, or wait for a free slot. Only a job due later is a reason to
        wake by the clock; waking for the due ones would spin as long as any job runs. A job
        another worker releases unchanged (its stop) or leaves to expire (its death) waits for
        the next event or at most MAX_IDLE_WAIT.
        """
        if not self.wakeup.listening:
            timeout = self.settings.poll_delay
        else:
            timeout = MAX_IDLE_WAIT
            if next_deferred_ms is not None:
                timeout = min(timeout, max(next_deferred_ms / 1000 - time.time(), 0.0))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wakeup.event.wait()

    async def _cancel_aborted(self, aborts: list[str]) -> None:
        """arq's _cancel_aborted_jobs, on the abort requests the poll read: cancel ours."""
        aborted = {job_id for job_id in aborts if job_id in self.job_tasks}
        for job_id in aborted:
            self.job_tasks[job_id].cancel()
        if aborted:
            self.aborting_tasks.update(aborted)
            await self.pool.zrem(abort_jobs_ss, *aborted)

    async def _start(self, claimed: Claimed) -> None:
        """Run a claimed job in a task of its own, in a slot (arq's start_jobs, after its claim)."""
        await self.sem.acquire()  # never waits: the poll claimed no more jobs than there are free slots
        self.job_counter += 1
        task = self.loop.create_task(self._run(claimed))
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[claimed.job_id] = task

    # --- a job -----------------------------------------------------------------------------------

    async def _run(self, claimed: Claimed) -> None:
        """arq's run_job for a job the poll claimed, its reads already done by the claim, and its
        end written by the finisher with others'.

        What arq's run_job does for a job of ``run_flow``, in its order and with its results: a
        job gone (expired), unreadable, aborted before it started, of an unknown function, or past
        its tries ends failed; otherwise it runs with arq's timeout (a safety net behind the
        runner's own); a ``Retry`` re-scores it, a cancel by shutdown releases it to run again,
        an abort or an error ends it failed. Not kept from arq: its per-job log lines (off in
        flowworker, which logs its own), cron jobs and the job hooks (flowworker has none).
        """
        try:
            await self._run_claimed(claimed)
        finally:
            if self._ready_left:
                self.wakeup.event.set()  # a slot is free for a job the last poll left

    async def _run_claimed(self, claimed: Claimed) -> None:
        job = _Job(claimed.job_id, claimed.job_try, timestamp_ms())
        function = await self._runnable(claimed, job)
        if function is None:
            return
        ctx = {
            **self.ctx,
            'job_id': job.job_id,
            'job_try': job.job_try,
            'enqueue_time': ms_to_datetime(job.enqueue_time_ms),
            'score': claimed.score,
        }
        timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        result: Any = _NO_RESULT
        finish, success, incr_score = False, False, None
        job.start_ms = timestamp_ms()
        task = self.loop.create_task(function.coroutine(ctx, *job.args, **job.kwargs))
        self.job_tasks[job.job_id] = task
        try:
            try:
                result = await asyncio.wait_for(task, timeout_s)
            finally:
                del self.job_tasks[job.job_id]
        except (Exception, asyncio.CancelledError) as e:
            if isinstance(e, Retry):
                incr_score = e.defer_score + (timestamp_ms() - claimed.score) if e.defer_score else None
                self.jobs_retried += 1
            elif job.job_id in self.aborting_tasks and isinstance(e, asyncio.CancelledError):
                result, finish = e, True
                self.aborting_tasks.remove(job.job_id)
                self.jobs_failed += 1
            elif isinstance(e, (asyncio.CancelledError, RetryJob)):
                self.jobs_retried += 1  # a stop: it runs again
            else:
                if not isinstance(e, FlowFailed):  # the runner logged its own failures
                    logger.warning('job %s failed: %s', job.job_id, describe_error(e))
                result, finish = e, True
                self.jobs_failed += 1
        else:
            success = finish = True
            self.jobs_complete += 1
        data = None if result is _NO_RESULT else self._result(job, success, result)
        await self._end(job.job_id, finish, data, incr_score)

    async def _runnable(self, claimed: Claimed, job: _Job) -> Function | None:
        """Read the claimed job into ``job``; its function, or None once the job has ended failed
        (gone, unreadable, aborted before it started, of an unknown function, out of tries)."""
        if not claimed.data:
            logger.warning('job %s expired', job.job_id)
            await self._failed(job, JobExecutionFailed('job expired'))
            return None
        try:
            job.function_name, job.args, job.kwargs, enqueue_job_try, job.enqueue_time_ms = (
                deserialize_job_raw(claimed.data, deserializer=self.job_deserializer)
            )
        except SerializationError as e:
            logger.exception('deserializing job %s failed', job.job_id)
            await self._failed(job, e)
            return None
        if claimed.aborted:
            if job.function_name == 'run_flow' and job.args:
                runner: Runner = self.ctx['runner']
                enqueued = ms_to_datetime(job.enqueue_time_ms)
                runner.aborted_before_start(job.job_id, job.job_try, str(job.args[0]), enqueued)
            await self._failed(job, asyncio.CancelledError())
            return None
        function = self.functions.get(job.function_name)
        if not isinstance(function, Function):
            logger.warning('job %s, function %r not found', job.job_id, job.function_name)
            await self._failed(job, JobExecutionFailed(f'function {job.function_name!r} not found'))
            return None
        if enqueue_job_try and enqueue_job_try > job.job_try:
            job.job_try = enqueue_job_try
            what, key = f'count the tries of job {job.job_id}', retry_key_prefix + job.job_id
            await self._until_done(what, self.pool.setex, key, RETRY_KEY_TTL, str(job.job_try))
        max_tries = self.max_tries if function.max_tries is None else function.max_tries
        if job.job_try > max_tries:
            logger.warning('job %s: max %d retries exceeded', job.job_id, max_tries)
            await self._failed(job, JobExecutionFailed(f'max {max_tries} retries exceeded'))
            return None
        return function

    async def _failed(self, job: _Job, error: BaseException) -> None:
        """End a job that did not run, failed with ``error`` (arq's run_job's job_failed)."""
        self.jobs_failed += 1
        await self._end(job.job_id, True, self._result(job, False, error))

    def _result(self, job: _Job, success: bool, result: Any) -> bytes | None:
        """The job's result as arq stores it, finished now (None when arq keeps no results)."""
        if not (self.keep_result_forever or self.keep_result_s > 0):
            return None
        return serialize_result(
            job.function_name,
            job.args,
            job.kwargs,
            job.job_try,
            job.enqueue_time_ms,
            success,
            result,
            job.start_ms,
            timestamp_ms(),
            f'{job.job_id}:{job.function_name}',
            self.queue_name,
            job_id=job.job_id,
            serializer=self.job_serializer,
        )

    async def _end(
        self, job_id: str, finish: bool, result: bytes | None, incr_score: int | None = None
    ) -> None:
        """Write the job's end with the finisher; a cancel (a stop) while it waits does not undo it."""
        keep_ms = 0 if self.keep_result_forever else int(self.keep_result_s * 1000)
        # released to run again: Redis publishes no event for a release with its score unchanged
        self._ready_left = self._ready_left or not finish
        await asyncio.shield(self.finisher.finish(Ending(job_id, finish, result, keep_ms, incr_score)))

    async def _until_done(self, what: str, call: Any, *args: Any) -> None:
        """Retry a Redis write that must happen until Redis takes it."""
        delays = backoff()
        while True:
            try:
                return await call(*args)  # type: ignore[no-any-return]
            except REDIS_ERRORS as e:
                delay = next(delays)
                logger.warning('cannot %s, retrying in %.1fs: %s', what, delay, describe_error(e))
                await asyncio.sleep(delay)


async def _wait_for_database(infra: Infrastructure, timeout: float = 60.0) -> None:
    """Check the schema, waiting up to ``timeout`` seconds for PostgreSQL to answer."""
    deadline = time.monotonic() + timeout
    delays = backoff()
    while True:
        try:
            return await check_schema(infra.engine)
        except DATABASE_ERRORS as e:
            if time.monotonic() > deadline:
                raise
            delay = next(delays)
            logger.warning('PostgreSQL is unreachable, retrying in %.1fs: %s', delay, describe_error(e))
            await asyncio.sleep(delay)


async def _release_lost_jobs(
    infra: Infrastructure, store: TaskStore, missing_before: set[str] | None = None
) -> set[str]:
    """Settle the attempts of dead workers, from arq's results or as lost, and release the lost jobs
    (see TaskStore.reconcile); the workers found without a heartbeat."""
    lost, missing = await store.reconcile(
        infra.redis,
        infra.settings.worker_id,
        heartbeat_key,
        datetime.now(UTC),
        outcome=outcome,
        missing_before=missing_before,
    )
    if lost:
        # their worker is gone: let arq run them again now rather than when the in-progress key expires
        await infra.redis.delete(*(in_progress_key_prefix + job_id for job_id in lost))
    return missing


async def _sweep_lost_jobs(infra: Infrastructure, store: TaskStore) -> None:
    """Every heartbeat TTL, release the jobs of workers whose heartbeat is gone and stayed gone
    since the previous look: a process that died and did not come back (a host lost, a unit
    stopped) would otherwise hold its jobs until arq's in-progress key expires, about the
    longest job timeout."""
    missing: set[str] = set()
    while True:
        await asyncio.sleep(TTL_INTERVALS * infra.settings.heartbeat_interval)
        try:
            missing = await _release_lost_jobs(infra, store, missing)
        except (*REDIS_ERRORS, *DATABASE_ERRORS) as e:
            logger.warning('cannot look for the jobs of dead workers: %s', describe_error(e))


async def serve(infra: Infrastructure, registry: Registry) -> int:
    """Run a worker until it is signalled to stop; the exit code."""
    settings = infra.settings
    jobs = JobCounts()
    store = TaskStore(infra.engine)
    heartbeat = Heartbeat(infra.redis, settings, jobs, database_ok=lambda: store.healthy)
    wakeup = QueueWakeup(
        infra.redis, settings.queue_key, settings.redis_settings().database, settings.worker_id
    )
    metrics = WorkerMetrics(
        settings.worker_id,
        settings.queue_name,
        registry.names(),
        settings.max_jobs,
        running=lambda: jobs.running,
        waiting=lambda: store.waiting,
        written=lambda: store.written,
    )
    # before the first PostgreSQL connection and after arq's ping: start-up connects are not counted
    count_database_reconnects(infra.engine, settings.database_pool_recycle, metrics.database_reconnects.inc)
    await count_redis_reconnects(infra.redis, metrics.redis_reconnects.inc)
    await _wait_for_database(infra)
    exporter = None
    if settings.metrics_serving_port:
        try:
            exporter = metrics.serve(settings.metrics_address, settings.metrics_serving_port)
        except OSError as e:
            logger.error(
                'cannot serve the metrics on %s:%d (%s): %s',
                settings.metrics_address,
                settings.metrics_serving_port,
                'FLOWWORKER_METRICS_PORT'
                + (' + FLOWWORKER_METRICS_PORT_OFFSET' if settings.metrics_port_offset else ''),
                e.strerror or e,
            )
            return 2
    worker = FlowWorker(
        infra=infra,
        registry=registry,
        store=store,
        heartbeat=heartbeat,
        wakeup=wakeup,
        jobs=jobs,
        metrics=metrics,
    )

    try:
        await _release_lost_jobs(infra, store)
    except (*REDIS_ERRORS, *DATABASE_ERRORS) as e:
        logger.warning(
            'cannot settle the records of workers that are gone (the sweep tries again): %s',
            describe_error(e),
        )
    await heartbeat.beat()
    background = [
        asyncio.create_task(store.run(), name='flowworker-store'),
        asyncio.create_task(heartbeat.run(), name='flowworker-heartbeat'),
        asyncio.create_task(_sweep_lost_jobs(infra, store), name='flowworker-sweep'),
    ]
    await wakeup.start()
    logger.info(
        'worker %s started on queue %s',
        settings.worker_id,
        settings.queue_key,
        extra={
            'max_jobs': settings.max_jobs,
            'flows': ','.join(registry.names()),
            'wakeup': 'events' if wakeup.listening else 'polling',
        },
    )
    try:
        await worker.async_run()
    except asyncio.CancelledError:
        # arq cancels its main task once a signal's drain is over; only a cancel of us is re-raised
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    finally:
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        await worker.finisher.wait(timeout=max(settings.heartbeat_interval, 5.0))
        await wakeup.stop()
        flushed = await store.flush(timeout=max(settings.heartbeat_interval, 5.0))
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # the flusher has put back what it was writing: what PostgreSQL did not take waits in Redis
        await store.spill(infra.redis, settings.worker_id)
        await heartbeat.clear()
        if exporter is not None:
            await asyncio.to_thread(metrics.stop, exporter)
    logger.info('worker %s stopped', settings.worker_id, extra={**vars(jobs), 'records_written': flushed})
    return 0
