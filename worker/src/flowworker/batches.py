"""Claim and finish arq jobs several at a time, in one round trip each, on arq's own keys.

arq's worker spends about seven round trips on a job: the queue read, the claim (WATCH the
in-progress key, EXISTS, ZSCORE, MULTI/PSETEX/EXEC), the read of the job (a MULTI of GET, INCR
and EXPIRE of the retry count, ZREM of the abort request) and the finish (a MULTI that stores the
result and deletes the job's keys). Here a poll is one script (:data:`CLAIM`) that does all that
arq does before a job runs, for as many ready jobs as the worker has free slots, and also reads
the abort requests and the next deferred job's time; and finished jobs go to Redis together
(:class:`Finisher`), one script for every job that ended while the previous write was in flight.

The keys, values and their lifetimes are arq's, written as arq writes them: a producer that
calls ``enqueue_job`` changes nothing, ``Job.status()``, ``Job.result()`` and ``Job.abort()``
see what they see with arq's worker, and an arq worker may work the same queue.

A script runs atomically, so the claim needs no WATCH: no other worker can take a job between
the look at its in-progress key and the write of it. It reaches each job's keys by name rather
than through ``KEYS`` (like arq itself, it does not support Redis Cluster). Scripts run with the
permissions of the Redis user that calls them (``acl.py``: EVALSHA and SCRIPT LOAD, no EVAL).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from arq.constants import (
    abort_job_max_age,
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.utils import timestamp_ms
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .infrastructure import REDIS_ERRORS, backoff, describe_error

logger = logging.getLogger('flowworker.batches')

# arq keeps a job's try count this long (its run_job)
RETRY_KEY_TTL = 88_400

# KEYS: the queue, arq's abort set. ARGV: now (ms), free slots, how many queued ids to look at,
# the in-progress key's life (ms), the abort set's cut-off, then the prefixes of the in-progress,
# job and retry keys. For each job it claims (not in progress anywhere, due): the in-progress key
# set (arq's start_jobs), its try counted and its abort request taken (arq's run_job); returns
# [id, score, job (empty if gone), try, aborted] per claimed job, every abort request, the
# score of the next deferred job (empty if none), and 1 if due jobs may be left unclaimed (the
# slots ran out, or more ids were due than it looked at), else 0.
CLAIM = """
local queue, abort = KEYS[1], KEYS[2]
local now, slots, hold = ARGV[1], tonumber(ARGV[2]), ARGV[4]
local running, jobs, retries = ARGV[6], ARGV[7], ARGV[8]
local claimed, left = {}, 1
if slots > 0 then
  local ready = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', 0, ARGV[3])
  if #ready < 2 * tonumber(ARGV[3]) then left = 0 end
  for i = 1, #ready, 2 do
    local id = ready[i]
    if redis.call('EXISTS', running .. id) == 0 then
      redis.call('SET', running .. id, '1', 'PX', hold)
      local try = redis.call('INCR', retries .. id)
      redis.call('EXPIRE', retries .. id, ARGV[9])
      local job = redis.call('GET', jobs .. id) or ''
      local aborted = redis.call('ZREM', abort, id)
      table.insert(claimed, {id, ready[i + 1], job, try, aborted})
      if #claimed >= slots then
        left = 1
        break
      end
    end
  end
end
local aborts = redis.call('ZRANGE', abort, 0, -1)
redis.call('ZREMRANGEBYSCORE', abort, ARGV[5], '+inf')
local deferred = redis.call('ZRANGEBYSCORE', queue, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
return {claimed, aborts, deferred[2] or '', left}
"""

# ARGV: the queue, arq's abort set, the prefixes of the result, in-progress, retry and job keys,
# then per job: id, what to do, result (may be empty), the result's life (ms, 0: forever), and
# the queue score to add. What: 'end' (arq's finish_job with finish, and finish_failed_job):
# store the result, delete the job's keys, take it out of the queue and the abort set; 'again'
# (finish_job without finish): release it, re-scored by the score to add when there is one.
# A job whose result Redis refuses keeps every key, and is named in the reply (its error after
# it) for the worker to try it again; the others end as if alone.
FINISH = """
local queue, abort, results, running, retries, jobs = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local refused = {}
for i = 7, #ARGV, 5 do
  local id, what, result, keep, incr = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if what == 'end' then
    local stored = true
    if result ~= '' then
      local reply
      if keep == '0' then
        reply = redis.pcall('SET', results .. id, result)
      else
        reply = redis.pcall('SET', results .. id, result, 'PX', keep)
      end
      if type(reply) == 'table' and reply.err then
        stored = false
        table.insert(refused, id)
        table.insert(refused, reply.err)
      end
    end
    if stored then
      redis.call('DEL', running .. id, retries .. id, jobs .. id)
      redis.call('ZREM', abort, id)
      redis.call('ZREM', queue, id)
    end
  else
    if incr ~= '0' then
      redis.call('ZINCRBY', queue, incr, id)
    end
    redis.call('DEL', running .. id)
  end
end
return refused
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker has claimed: what arq's start_jobs and the start of its run_job read."""

    job_id: str
    score: int
    data: bytes  # the job as the producer stored it; empty if its key is gone (expired)
    job_try: int
    aborted: bool  # an abort request was waiting for it (taken out of arq's abort set)


@dataclass(frozen=True, slots=True)
class Poll:
    claimed: list[Claimed]
    aborts: list[str]  # every job in arq's abort set
    next_deferred_ms: float | None  # the score of the first job due later, if any
    ready_left: bool  # due jobs may be left: the slots ran out (or none were offered), or the read limit


class Claimer:
    """Claim ready jobs of a queue for free slots in one round trip (:data:`CLAIM`)."""

    def __init__(self, redis: Redis, queue_name: str, in_progress_ms: int, read_limit: int) -> None:
        self._script = redis.register_script(CLAIM)
        self._queue_name = queue_name
        self._in_progress_ms = in_progress_ms
        self._read_limit = read_limit

    async def poll(self, slots: int) -> Poll:
        """Claim up to ``slots`` due jobs (none with 0), and read the abort requests and the next
        deferred job's time."""
        now = timestamp_ms()
        claimed, aborts, deferred, left = await self._script(
            keys=[self._queue_name, abort_jobs_ss],
            args=[
                now,
                slots,
                self._read_limit,
                self._in_progress_ms,
                now + abort_job_max_age,  # arq's own cut-off (_cancel_aborted_jobs)
                in_progress_key_prefix,
                job_key_prefix,
                retry_key_prefix,
                RETRY_KEY_TTL,
            ],
        )
        return Poll(
            [
                Claimed(job_id.decode(), int(float(score)), data, int(job_try), bool(aborted))
                for job_id, score, data, job_try, aborted in claimed
            ],
            [job_id.decode() for job_id in aborts],
            float(deferred) if deferred else None,
            bool(left),
        )


@dataclass(frozen=True, slots=True)
class Ending:
    """A job's end, as arq's finish_job writes it: ``finish`` ends it (its result stored, its keys
    deleted), otherwise it is released to run again, re-scored by ``incr_score`` if set."""

    job_id: str
    finish: bool
    result: bytes | None
    keep_ms: int  # 0: forever
    incr_score: int | None

    def args(self) -> tuple[str, str, bytes, int, int]:
        return (
            self.job_id,
            'end' if self.finish else 'again',
            self.result or b'',
            self.keep_ms,
            self.incr_score or 0,
        )


class Finisher:
    """Write the ends of jobs to Redis together: every end handed over while the previous write
    was in flight goes in the next one (a group commit, with no wait of its own).

    :meth:`finish` returns once the job's end is in Redis. A write Redis does not take (unreachable,
    or it refuses a job's result, e.g. out of memory) is tried again with back-off until it does:
    a job's keys stay, so it is neither lost nor run again, and its slot stays taken meanwhile.
    """

    def __init__(self, redis: Redis, queue_name: str) -> None:
        self._script = redis.register_script(FINISH)
        self._head = [
            queue_name,
            abort_jobs_ss,
            result_key_prefix,
            in_progress_key_prefix,
            retry_key_prefix,
            job_key_prefix,
        ]
        self._pending: list[tuple[Ending, asyncio.Future[None]]] = []
        self._writing = False
        # held: a task awaiting Redis is otherwise reachable only through its connection, which the
        # pool may hold weakly, and a garbage collection would destroy it mid-write
        self._task: asyncio.Task[None] | None = None
        # writes since the start, and the jobs they carried
        self.writes = 0
        self.ended = 0

    async def finish(self, ending: Ending) -> None:
        """Write ``ending`` with the others that come meanwhile; return once Redis has it."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((ending, done))
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().call_soon(self._start)
        await done

    def _start(self) -> None:
        # a task of its own: a job whose run is cancelled while it waits does not stop the others'
        self._task = asyncio.get_running_loop().create_task(self._write_all(), name='flowworker-finish')
        self._task.add_done_callback(_log_crash)

    async def _write_all(self) -> None:
        delays: Iterator[float] | None = None
        batch: list[tuple[Ending, asyncio.Future[None]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    refused = await self._write([ending for ending, _ in batch])
                except (*REDIS_ERRORS, ResponseError) as e:
                    self._pending[:0] = batch
                    delays = delays or backoff()
                    delay = next(delays)
                    logger.warning(
                        'cannot finish %d jobs, retrying in %.1fs: %s', len(batch), delay, describe_error(e)
                    )
                    await asyncio.sleep(delay)
                    continue
                for ending, done in batch:
                    if ending.job_id not in refused and not done.done():
                        done.set_result(None)
                if refused:
                    self._pending[:0] = [(ending, done) for ending, done in batch if ending.job_id in refused]
                    delays = delays or backoff()
                    delay = next(delays)
                    logger.warning(
                        'Redis refused the results of %d jobs, retrying in %.1fs: %s',
                        len(refused),
                        delay,
                        '; '.join(f'{job_id}: {error}' for job_id, error in refused.items()),
                    )
                    await asyncio.sleep(delay)
                else:
                    delays = None
        except BaseException as e:
            # not Redis failing (that is retried): a bug; fail every waiting job rather than hang it
            for _, done in [*batch, *self._pending]:
                if not done.done():
                    done.set_exception(
                        e if isinstance(e, Exception) else RuntimeError('the finisher stopped')
                    )
            self._pending = []
            raise
        finally:
            self._writing = False

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the ends handed over to be written; False if some are not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._writing or self._pending:
            if loop.time() > deadline:
                logger.error('%d job ends could not be written to Redis before shutdown', len(self._pending))
                return False
            await asyncio.sleep(0.01)
        return True

    async def _write(self, endings: list[Ending]) -> dict[str, str]:
        """One script for ``endings``; the jobs whose result Redis refused, with its error."""
        args: list[Any] = list(self._head)
        for ending in endings:
            args.extend(ending.args())
        reply = await self._script(args=args)
        self.writes += 1
        self.ended += len(endings)
        return {reply[i].decode(): reply[i + 1].decode('utf-8', 'replace') for i in range(0, len(reply), 2)}


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error('the job finisher failed', exc_info=task.exception())
