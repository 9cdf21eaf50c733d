"""``run_flow``: the one arq task every job runs, and the policy for each way a flow can end.

Producer contract: ``enqueue_job('run_flow', flow_name, params, _queue_name='arq:queue:<name>')``.

- success: the flow's return value is the job result; the attempt is ``succeeded``.
- unknown flow, bad params, any error: ``failed`` at once, never retried.
- the flow raises :class:`Retry`: ``retrying``, run again until ``FLOWWORKER_MAX_TRIES`` attempts.
- timeout: the first one is ``retrying`` and the job runs once more; the second is ``failed``
  (arq itself never retries a timed-out job).
- cancelled by ``flowworker`` shutdown: ``interrupted``, and arq re-queues the job.
- aborted (arq ``Job.abort``, ``flowworker cancel``): ``cancelled``, running or not yet started.

When a process ends between arq storing a job's result and its record being written, the record
is settled later from that result (:func:`outcome`, used by ``TaskStore.reconcile``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Set
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from arq import Retry
from arq.connections import ArqRedis
from arq.jobs import JobResult

from .heartbeat import JobCounts
from .infrastructure import REDIS_ERRORS
from .metrics import WorkerMetrics
from .registry import BadParams, Registry, UnknownFlow
from .settings import Settings
from .store import Outcome, Row, TaskStore

logger = logging.getLogger('flowworker.runner')

TIMEOUTS_KEY_PREFIX = 'flowworker:timeouts:'
TIMEOUTS_KEY_TTL = 86_400


class FlowFailed(Exception):
    """The job failed for good; the message says why."""


def outcome(result: JobResult) -> Outcome:
    """The status, error and result of the attempt that ``result`` (arq's, of its job) ended."""
    if result.success:
        return 'succeeded', None, result.result
    error = result.result
    if isinstance(error, asyncio.CancelledError):
        return 'cancelled', 'aborted', None
    if isinstance(error, FlowFailed):
        return 'failed', str(error), None
    return 'failed', f'{type(error).__name__}: {error}', None  # arq's own timeout


@dataclass(frozen=True)
class JobInfo:
    """What a running flow may want to know about its job: see :func:`current_job`."""

    job_id: str
    attempt: int
    flow: str
    queue: str
    worker_id: str


_current_job: ContextVar[JobInfo] = ContextVar('flowworker_current_job')


def current_job() -> JobInfo:
    """The job the calling flow runs in (raises LookupError outside a flow)."""
    return _current_job.get()


class Attempt:
    """One attempt of a job: its task record, counts and log lines."""

    def __init__(self, row: Row, store: TaskStore, jobs: JobCounts, metrics: WorkerMetrics) -> None:
        self.row = row
        self.job_id: str = row['job_id']
        self.number: int = row['attempt']
        self._store = store
        self._jobs = jobs
        self._metrics = metrics
        self._started = time.monotonic()
        self._running = False
        self._log = {'job_id': self.job_id, 'flow': row['flow'], 'attempt': self.number}

    def start(self, due_ms: float) -> None:
        self._store.record(self.row)
        self._jobs.running += 1
        self._running = True
        self._metrics.started(time.time() - due_ms / 1000)
        logger.info('task started', extra=self._log)

    def succeed(self, result: Any) -> None:
        self._jobs.completed += 1
        self._end('succeeded', result=result)

    def retry(self, reason: str) -> None:
        self._jobs.retried += 1
        self._end('retrying', reason)

    def cancel(self, aborted: bool) -> None:
        if aborted:
            self._jobs.failed += 1
            self._end('cancelled', 'aborted', level=logging.WARNING)
        else:
            self._end('interrupted', 'the worker stopped; the job is queued again')

    def fail(self, error: str, exc_info: bool = False) -> NoReturn:
        """Record the attempt failed and fail the job for good (arq keeps :class:`FlowFailed`)."""
        self._jobs.failed += 1
        self._end('failed', error, level=logging.WARNING, exc_info=exc_info)
        raise FlowFailed(error) from None

    def _end(
        self,
        status: str,
        error: str | None = None,
        result: Any = None,
        level: int = logging.INFO,
        exc_info: bool = False,
    ) -> None:
        ran = time.monotonic() - self._started if self._running else None
        if self._running:
            self._jobs.running -= 1
            self._running = False
        self._metrics.ended(self.row['flow'], status, ran)
        self.row = {
            **self.row,
            'status': status,
            'finished_at': datetime.now(UTC),
            'error': error,
            'result': result,
        }
        self._store.record(self.row)
        extra = {**self._log, 'duration': round(time.monotonic() - self._started, 3)}
        if error:
            extra['error'] = error
        logger.log(level, 'task %s', status, extra=extra, exc_info=exc_info)


@dataclass
class Runner:
    settings: Settings
    registry: Registry
    store: TaskStore
    redis: ArqRedis
    jobs: JobCounts
    aborting: Set[str]
    metrics: WorkerMetrics

    def _attempt(self, job_id: str, number: int, flow_name: str, enqueued_at: datetime) -> Attempt:
        row = {
            'job_id': job_id,
            'attempt': number,
            'flow': flow_name,
            'queue': self.settings.queue_name,
            'status': 'running',
            'worker_id': self.settings.worker_id,
            'enqueued_at': enqueued_at,
            'started_at': datetime.now(UTC),
            'finished_at': None,
            'error': None,
            'result': None,
        }
        return Attempt(row, self.store, self.jobs, self.metrics)

    def aborted_before_start(self, job_id: str, number: int, flow_name: str, enqueued_at: datetime) -> None:
        """arq aborted the job before ``run_flow`` began: the attempt is recorded ``cancelled`` too."""
        self._attempt(job_id, number, flow_name, enqueued_at).cancel(aborted=True)

    async def run(self, ctx: dict[str, Any], flow_name: str, params: dict[str, Any]) -> Any:
        attempt = self._attempt(ctx['job_id'], ctx['job_try'], flow_name, ctx['enqueue_time'])
        number = attempt.number
        if number > self.settings.max_tries:
            attempt.fail(
                f'gave up after {number - 1} attempts (FLOWWORKER_MAX_TRIES={self.settings.max_tries})'
            )
        try:
            flow = self.registry.get(flow_name)
        except UnknownFlow as e:
            attempt.fail(str(e))

        attempt.start(ctx['score'])
        settings = self.settings
        _current_job.set(JobInfo(attempt.job_id, number, flow_name, settings.queue_name, settings.worker_id))
        timeout = flow.timeout or self.settings.job_timeout
        try:
            async with asyncio.timeout(timeout) as deadline:
                result = await flow.run(params)
        except BadParams as e:
            attempt.fail(str(e))
        except TimeoutError:
            if not deadline.expired():
                attempt.fail('TimeoutError raised by the flow', exc_info=True)
            if not await self._first_timeout(attempt.job_id):
                attempt.fail(f'timed out after {timeout:g}s, the second time')
            attempt.retry(f'timed out after {timeout:g}s; running it once more')
            raise Retry(defer=0) from None
        except Retry:
            if number >= self.settings.max_tries:
                attempt.fail(f'asked for a retry after attempt {number} of {self.settings.max_tries}')
            attempt.retry('the flow asked for a retry')
            raise
        except asyncio.CancelledError:
            attempt.cancel(aborted=attempt.job_id in self.aborting)
            raise
        except Exception as e:
            attempt.fail(f'{type(e).__name__}: {e}', exc_info=True)
        attempt.succeed(result)
        return result

    async def _first_timeout(self, job_id: str) -> bool:
        """Count this job's timeouts; True for its first (when Redis cannot count, assume so)."""
        key = TIMEOUTS_KEY_PREFIX + job_id
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, TIMEOUTS_KEY_TTL)
                count, _ = await pipe.execute()
        except REDIS_ERRORS:
            return True
        return int(count) == 1


async def run_flow(ctx: dict[str, Any], flow_name: str, params: dict[str, Any] | None = None) -> Any:
    """The arq task: run flow ``flow_name`` with ``params`` (keyword arguments of the flow)."""
    runner: Runner = ctx['runner']
    return await runner.run(ctx, flow_name, {} if params is None else params)
