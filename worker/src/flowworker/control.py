"""Changing the queue by hand: cancel one job, purge a queue. Used by the CLI and the monitor.

- cancel: arq's abort. A running job is cancelled by the worker that runs it, a queued one by the
  worker that takes it; either way that worker records the attempt ``cancelled``.
- purge: the guide's "clear Redis queue if corrupted" (``DEL arq:queue:default``) done safely: it
  removes the queued and deferred jobs one transaction per batch, with their job keys, and
  leaves running jobs alone, so no worker is left running a job whose key has gone.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import Job, ResultNotFound
from redis.exceptions import WatchError

from .settings import QUEUE_KEY_PREFIX

logger = logging.getLogger('flowworker.control')

PURGE_BATCH = 100
# transactions a purge batch may lose to workers starting its jobs before it gives up
PURGE_TRIES = 2 * PURGE_BATCH + 1
# a purged job's in-progress key lives this long (ms): a worker that read the job before the purge
# then sees it taken and skips it, instead of running a job whose key has gone
PURGE_FENCE_MS = 10_000


class Outcome(enum.StrEnum):
    cancelled = 'cancelled'
    requested = 'requested'
    finished = 'finished'
    not_found = 'not_found'


@dataclass(frozen=True)
class Cancel:
    job_id: str
    outcome: Outcome
    detail: str


async def _queue_of(redis: ArqRedis, job_id: str) -> str | None:
    """The queue (its key) that holds ``job_id``; a running job stays in its queue until it ends."""
    async for key in redis.scan_iter(match=QUEUE_KEY_PREFIX + '*', _type='zset'):
        if await redis.zscore(key, job_id) is not None:
            return str(key.decode())
    return None


async def cancellable(redis: ArqRedis, job_id: str, queue: str | None) -> bool:
    """``job_id`` waits or runs, so cancel may act on it: it has no result yet and is in ``queue``
    (a queue name, from its task record; None: in whichever queue holds it)."""
    if await redis.exists(result_key_prefix + job_id):
        return False
    if queue is None:
        return await _queue_of(redis, job_id) is not None
    return await redis.zscore(QUEUE_KEY_PREFIX + queue, job_id) is not None


async def cancel(redis: ArqRedis, job_id: str, wait: float) -> Cancel:
    """Abort ``job_id`` and wait up to ``wait`` seconds for a worker to confirm it."""
    if await redis.exists(result_key_prefix + job_id):
        return Cancel(job_id, Outcome.finished, f'job {job_id} has already finished')
    queue = await _queue_of(redis, job_id)
    if queue is None:
        return Cancel(job_id, Outcome.not_found, f'job {job_id} is not queued or running')
    logger.warning('cancelling job %s on %s', job_id, queue)
    try:
        aborted = await Job(job_id, redis, _queue_name=queue).abort(timeout=wait, poll_delay=0.1)
    except TimeoutError:
        return Cancel(
            job_id,
            Outcome.requested,
            f'job {job_id}: cancel requested; no worker has acted on it within {wait:g}s '
            '(it is cancelled when a worker on its queue takes it)',
        )
    except ResultNotFound:
        aborted = False
    if aborted:
        return Cancel(job_id, Outcome.cancelled, f'job {job_id} cancelled')
    return Cancel(job_id, Outcome.finished, f'job {job_id} finished before it could be cancelled')


@dataclass(frozen=True)
class Purged:
    queue: str
    removed: int
    running: int


async def _purge_batch(redis: ArqRedis, queue_key: str, job_ids: list[str]) -> tuple[int, int]:
    """Remove the jobs of ``job_ids`` that are not running, atomically; (removed, running)."""
    fences = [in_progress_key_prefix + job_id for job_id in job_ids]
    for _ in range(PURGE_TRIES):
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(*fences)
                taken = await pipe.mget(fences)
                idle = [job_id for job_id, running in zip(job_ids, taken, strict=True) if running is None]
                pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                for job_id in idle:
                    pipe.zrem(queue_key, job_id)
                    pipe.delete(job_key_prefix + job_id, retry_key_prefix + job_id)
                    pipe.psetex(in_progress_key_prefix + job_id, PURGE_FENCE_MS, b'purged')
                await pipe.execute()
            except WatchError:
                continue  # a worker started one of them meanwhile: look again
        return len(idle), len(job_ids) - len(idle)
    raise RuntimeError(f'{queue_key}: workers kept taking jobs; purge gave up (run it again)')


async def purge(redis: ArqRedis, queue_name: str) -> Purged:
    """Remove every job of ``queue_name`` that is not running: queued, deferred, waiting to retry."""
    queue_key = QUEUE_KEY_PREFIX + queue_name
    job_ids = [job_id.decode() for job_id in await redis.zrange(queue_key, 0, -1)]
    removed = running = 0
    for start in range(0, len(job_ids), PURGE_BATCH):
        batch_removed, batch_running = await _purge_batch(
            redis, queue_key, job_ids[start : start + PURGE_BATCH]
        )
        removed += batch_removed
        running += batch_running
    logger.warning('purged %d jobs from %s (%d running kept)', removed, queue_key, running)
    return Purged(queue_key, removed, running)


async def queued(redis: ArqRedis, queue_name: str) -> int:
    """Jobs in the queue, running ones included (ZCARD)."""
    return int(await redis.zcard(QUEUE_KEY_PREFIX + queue_name))
