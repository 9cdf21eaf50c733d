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
from datetime import UTC, datetime
from typing import Any

from arq import Worker
from arq.constants import in_progress_key_prefix
from arq.jobs import deserialize_result
from arq.worker import func

from .heartbeat import TTL_INTERVALS, Heartbeat, JobCounts, heartbeat_key
from .infrastructure import (
    REDIS_ERRORS,
    Infrastructure,
    backoff,
    count_database_reconnects,
    count_redis_reconnects,
    describe_error,
)
from .metrics import WorkerMetrics
from .registry import Registry
from .runner import Runner, outcome, run_flow
from .schema import check as check_schema
from .store import DATABASE_ERRORS, TaskStore
from .wakeup import QueueWakeup

logger = logging.getLogger('flowworker.worker')

# arq's own job timeout fires only if ours (in run_flow) somehow did not
ARQ_TIMEOUT_GRACE = 5.0
# longest idle wait while keyspace events wake us: a safety net for a missed event
MAX_IDLE_WAIT = 1.0


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
        self._started_jobs = 0
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
        self.wakeup.event.clear()
        self.allow_pick_jobs = not self.draining and self.store.healthy
        self._started_jobs = 0
        try:
            await super()._poll_iteration()
            if not self._started_jobs:
                await self._idle_wait()
        except REDIS_ERRORS as e:
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

    async def _idle_wait(self) -> None:
        """Wait until a job may be startable: a queued job, a free slot, or the next deferred job.

        The jobs already due were just tried: they run (arq keeps a job in its queue until it
        ends), here or elsewhere, or wait for a free slot. Only a job due later is a reason to
        wake by the clock; waking for the due ones would spin as long as any job runs.
        """
        if not self.wakeup.listening:
            timeout = self.settings.poll_delay
        else:
            timeout = MAX_IDLE_WAIT
            now = time.time()
            deferred = await self.pool.zrangebyscore(
                self.queue_name, f'({now * 1000:.0f}', '+inf', start=0, num=1, withscores=True
            )
            if deferred:
                timeout = min(timeout, max(deferred[0][1] / 1000 - now, 0.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wakeup.event.wait(), timeout)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        for job_id in job_ids:
            if job_id.decode() in self.tasks:
                continue  # ours and running: no need to ask Redis (3 round trips) whether it is taken
            before = self.job_counter
            try:
                await super().start_jobs([job_id])
            except REDIS_ERRORS:
                # arq counted the job before Redis failed: give the slot back
                if self.job_counter > before:
                    self._release_sem_dec_counter_on_complete()
                raise
            if self.job_counter > before:
                self._started_jobs += 1
            elif self.job_counter >= self.max_jobs:
                return

    # --- a job's bookkeeping in Redis ------------------------------------------------------------

    async def run_job(self, job_id: str, score: int) -> None:
        """Run a job; if Redis fails before it starts, try again once Redis is back."""
        delays = backoff()
        try:
            while True:
                try:
                    return await super().run_job(job_id, score)
                except REDIS_ERRORS as e:
                    # finish_job retries by itself, so the flow has not run: it is safe to start over
                    delay = next(delays)
                    logger.warning(
                        'cannot start job %s, retrying in %.1fs: %s', job_id, delay, describe_error(e)
                    )
                    await asyncio.sleep(delay)
        finally:
            self.wakeup.event.set()  # a slot is free

    async def finish_job(self, job_id: str, *args: Any) -> None:
        await self._until_done(f'finish job {job_id}', super().finish_job, job_id, *args)

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        await self._until_done(f'finish job {job_id}', super().finish_failed_job, job_id, result_data)
        if result_data is not None:
            self._record_if_aborted(job_id, result_data)

    def _record_if_aborted(self, job_id: str, result_data: bytes) -> None:
        """arq ends a job aborted before it started here, without running it: record it cancelled."""
        result = deserialize_result(result_data, deserializer=self.job_deserializer)
        if (
            isinstance(result.result, asyncio.CancelledError)
            and result.function == 'run_flow'
            and result.args
        ):
            runner: Runner = self.ctx['runner']
            runner.aborted_before_start(job_id, result.job_try, str(result.args[0]), result.enqueue_time)

    async def _until_done(self, what: str, call: Any, *args: Any) -> None:
        """Retry a Redis write that must happen (a job's end) until Redis takes it."""
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
