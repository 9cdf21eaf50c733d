"""Task records, written behind the jobs.

A job never waits for PostgreSQL: it hands its row to :meth:`TaskStore.record` and moves on. One
flusher writes whatever has gathered while its previous write was in flight, as one upsert (a
group commit), so the bookkeeping costs a statement per batch, not per job. A row replaces any
older row of the same attempt still waiting, so a batch never holds one attempt twice.

The flusher keeps one connection of the SQLAlchemy pool and sends the batch through asyncpg
itself: one prepared statement that takes a column of values per parameter (``unnest``), in one
round trip. Through SQLAlchemy's executemany the same write costs several times the CPU, and at
thousands of jobs a second the worker has no CPU to spare.

While PostgreSQL is unreachable the rows stay in memory, the flusher retries with back-off and
:attr:`TaskStore.healthy` is false (the worker stops picking jobs); rows still unwritten when the
process stops go to Redis (:meth:`TaskStore.spill`). On start-up, and every few heartbeat intervals
after, :meth:`TaskStore.reconcile` settles the records of processes that are gone: the rows they
left in Redis are written; an attempt left ``running`` whose job has arq's result (the process
ended after arq stored it, before its record was written) gets its real outcome from that
result; only the others are ``lost``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, cast

from arq.constants import result_key_prefix
from arq.jobs import DeserializationError, JobResult, deserialize_result
from asyncpg import InterfaceError, PostgresError
from redis.asyncio import Redis
from sqlalchemy import bindparam, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .infrastructure import REDIS_ERRORS, backoff, describe_error

logger = logging.getLogger('flowworker.store')

# PostgreSQL did not answer: SQLAlchemy's errors, and asyncpg's own where the store talks to
# asyncpg directly
DATABASE_ERRORS = (SQLAlchemyError, PostgresError, InterfaceError, OSError, asyncio.TimeoutError)

Row = dict[str, Any]
# an attempt's status, error and result, from the result arq stored for its job (runner.outcome)
Outcome = tuple[str, str | None, Any]
MAX_BATCH = 1000
# seconds the flusher waits for more rows before it writes (records lag the jobs by about this)
LINGER = 0.05
# the rows a worker could not write before it stopped wait in Redis (spill_key) this long at most,
# and the ids of such workers in this set
SPILL_KEY_PREFIX = 'flowworker:records:'
SPILL_TTL = 7 * 86_400
SPILLED_KEY = 'flowworker:records-waiting'


COLUMNS = (
    'job_id',
    'attempt',
    'flow',
    'queue',
    'status',
    'worker_id',
    'enqueued_at',
    'started_at',
    'finished_at',
    'error',
    'result',
)
# one array per column; a late or repeated write never turns a finished attempt back into a
# running one, and a living worker may still finish an attempt that a reconcile took for lost
UPSERT = """
INSERT INTO flow_task_attempts (job_id, attempt, flow, queue, status, worker_id,
                                enqueued_at, started_at, finished_at, error, result)
SELECT * FROM unnest($1::text[], $2::integer[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::text[], $11::jsonb[])
ON CONFLICT (job_id, attempt) DO UPDATE
SET status = excluded.status, worker_id = excluded.worker_id, finished_at = excluded.finished_at,
    error = excluded.error, result = excluded.result
WHERE flow_task_attempts.status IN ('running', 'lost')
"""


# an attempt whose job has arq's result: the outcome that result records, where it is still running
RECORD_OUTCOMES = text("""
UPDATE flow_task_attempts AS a
SET status = o.status, finished_at = o.finished_at, error = o.error, result = o.result
FROM unnest(CAST(:job_ids AS text[]), CAST(:attempts AS integer[]), CAST(:statuses AS text[]),
            CAST(:finished AS timestamptz[]), CAST(:errors AS text[]), CAST(:results AS jsonb[]))
     AS o(job_id, attempt, status, finished_at, error, result)
WHERE a.job_id = o.job_id AND a.attempt = o.attempt AND a.status = 'running'
""")
# the others: lost; the jobs whose lost attempt is their latest may run again
MARK_LOST = text("""
UPDATE flow_task_attempts AS a
SET status = 'lost', finished_at = :now,
    error = 'the worker stopped without finishing this attempt (killed or crashed)'
FROM unnest(CAST(:job_ids AS text[]), CAST(:attempts AS integer[])) AS l(job_id, attempt)
WHERE a.job_id = l.job_id AND a.attempt = l.attempt AND a.status = 'running'
RETURNING a.job_id, NOT EXISTS (SELECT 1 FROM flow_task_attempts AS n
                                WHERE n.job_id = a.job_id AND n.attempt > a.attempt) AS latest
""")
UNSETTLED = text(
    "SELECT job_id, attempt FROM flow_task_attempts WHERE status = 'running' AND worker_id IN :dead "
    'AND started_at < :now'
).bindparams(bindparam('dead', expanding=True))


# a JSON escape of NUL that is not itself escaped: jsonb (like text) cannot hold NUL
_JSON_NUL = re.compile(r'(?<!\\)((?:\\\\)*)\\u0000')


def _json(result: Any) -> str | None:
    """A result as JSON that jsonb takes: no NaN or Infinity (then its repr), no NUL."""
    if result is None:
        return None
    try:
        encoded = json.dumps(result, default=repr, allow_nan=False)
    except ValueError:
        encoded = json.dumps(repr(result))
    return _JSON_NUL.sub(r'\1', encoded) if '\\u0000' in encoded else encoded


def _columns(rows: list[Row]) -> list[list[Any]]:
    """The batch as one list per column, results as JSON text, errors without NUL."""
    columns = [[row[name] for row in rows] for name in COLUMNS]
    columns[-2] = [e.replace('\x00', '') if isinstance(e, str) else e for e in columns[-2]]
    columns[-1] = [_json(r) for r in columns[-1]]
    return columns


async def _results(redis: Redis, attempts: list[tuple[str, int]]) -> dict[tuple[str, int], JobResult]:
    """arq's results of these attempts: a job's result names the try that produced it."""
    if not attempts:
        return {}
    raw = await redis.mget([result_key_prefix + job_id for job_id, _ in attempts])
    found = {}
    for (job_id, number), data in zip(attempts, raw, strict=True):
        if data is None:
            continue
        try:
            result = deserialize_result(data)
        except DeserializationError as e:
            logger.warning('cannot read the result of job %s: %s', job_id, e)
            continue
        if result.job_try == number:
            found[(job_id, number)] = result
    return found


class TaskStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pending: dict[tuple[str, int], Row] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.healthy = True
        # rows written since the start (flowworker_records_written_total)
        self.written = 0

    @property
    def waiting(self) -> int:
        """Task records not written yet."""
        return len(self._pending)

    def record(self, row: Row) -> None:
        """Queue ``row`` (a full attempt: every column of ``flow_task_attempts``) for the next write."""
        self._pending[(row['job_id'], row['attempt'])] = row
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """The flusher: write batches until cancelled, reconnecting with back-off.

        It never ends but by its cancel: a flusher that ended would write no record again while
        the jobs ran on. An error that is not a database's (a driver's unforeseen one) is retried
        the same way, logged with its traceback.
        """
        delays = backoff()
        while True:
            try:
                async with self._engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    await self._flush_forever(raw.driver_connection)
            except Exception as e:  # any error: see the docstring
                delay = next(delays)
                logger.warning(
                    'cannot write %d task records, retrying in %.1fs: %s',
                    len(self._pending),
                    delay,
                    describe_error(e),
                    exc_info=not isinstance(e, DATABASE_ERRORS),
                )
                self._set_health(False)
                await asyncio.sleep(delay)
            else:
                delays = backoff()

    async def _flush_forever(self, connection: Any) -> None:
        while True:
            await self._wake.wait()
            # let a batch gather: a job's start row is then mostly replaced by its end row
            await asyncio.sleep(LINGER)
            self._wake.clear()
            while self._pending:
                keys = list(self._pending)[:MAX_BATCH]
                batch = {key: self._pending.pop(key) for key in keys}
                try:
                    await connection.execute(UPSERT, *_columns(list(batch.values())))
                except BaseException:
                    for key, row in batch.items():
                        self._pending.setdefault(key, row)  # a newer row of the attempt wins
                    self._wake.set()
                    raise
                self.written += len(batch)
                self._set_health(True)
            self._idle.set()

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every queued row is written; False if some are not."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.error('%d task records could not be written before shutdown', len(self._pending))
            return False
        return True

    def _set_health(self, healthy: bool) -> None:
        if healthy and not self.healthy:
            logger.warning('PostgreSQL is reachable again; task records are being written')
        self.healthy = healthy

    async def spill(self, redis: Redis, worker_id: str) -> int:
        """Hand the rows PostgreSQL did not take before shutdown to Redis (:func:`spill_key`), where
        this worker id's next start, or a living worker's sweep once it is gone, writes them."""
        rows = list(self._pending.values())
        if not rows:
            return 0
        try:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.rpush(spill_key(worker_id), *(json.dumps(row, default=_encode) for row in rows))
                pipe.expire(spill_key(worker_id), SPILL_TTL)
                pipe.sadd(SPILLED_KEY, worker_id)
                await pipe.execute()
        except REDIS_ERRORS as e:
            logger.error('%d task records are lost: neither PostgreSQL nor Redis took them: %s', len(rows), e)
            return 0
        self._pending.clear()
        logger.warning(
            'handed %d task records to Redis (%s) for the next worker to write',
            len(rows),
            spill_key(worker_id),
        )
        return len(rows)

    async def reconcile(
        self,
        redis: Redis,
        worker_id: str,
        heartbeat_key: Callable[[str], str],
        now: datetime,
        *,
        outcome: Callable[[JobResult], Outcome],
        missing_before: set[str] | None = None,
    ) -> tuple[list[str], set[str]]:
        """Settle the records of workers that are gone: the rows they handed to Redis at shutdown are
        written, their running attempts get the outcome of arq's result, or are marked lost.

        At start-up (``missing_before`` None): this id's earlier life and every worker with no
        heartbeat. In a later sweep: the workers with no heartbeat now that had none at the
        previous sweep either (``missing_before``), so a worker that is only re-writing its
        heartbeat after a Redis outage is not taken for dead.

        Returns the jobs whose lost attempt is their latest, which may run again at once, and the
        workers found without a heartbeat (the next sweep's ``missing_before``).
        """
        async with self._engine.begin() as conn:
            running = text("SELECT DISTINCT worker_id FROM flow_task_attempts WHERE status = 'running'")
            spilled = {
                member.decode() for member in await cast(Awaitable[set[bytes]], redis.smembers(SPILLED_KEY))
            }
            owners = sorted({*(await conn.scalars(running)).all(), *spilled})
            missing = {w for w in owners if w != worker_id and not await redis.exists(heartbeat_key(w))}
            if missing_before is None:
                dead = [w for w in owners if w == worker_id or w in missing]
            else:
                dead = sorted(missing & missing_before)
            if not dead:
                return [], missing
            handed = await _write_spilled(conn, redis, [w for w in dead if w in spilled])
            ended, rows = await _settle(conn, redis, dead, now, outcome)
        if handed:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(*map(spill_key, handed))
                pipe.srem(SPILLED_KEY, *handed)
                await pipe.execute()
        for count, what in (
            (sum(handed.values()), 'wrote %d task records that workers handed to Redis at shutdown: %s'),
            (
                ended,
                'recorded %d task attempts from their results in Redis (their worker stopped before '
                'writing them): %s',
            ),
            (len(rows), 'marked %d task attempts lost from workers that are gone: %s'),
        ):
            if count:
                logger.warning(what, count, ', '.join(dead))
        return [job_id for job_id, latest in rows if latest], missing


def spill_key(worker_id: str) -> str:
    """The Redis list of the records ``worker_id`` could not write before it stopped (JSON rows)."""
    return SPILL_KEY_PREFIX + worker_id


def _encode(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else repr(value)


def _decode(raw: bytes) -> Row:
    row: Row = json.loads(raw)
    for name in ('enqueued_at', 'started_at', 'finished_at'):
        if row[name] is not None:
            row[name] = datetime.fromisoformat(row[name])
    return row


async def _write_spilled(conn: AsyncConnection, redis: Redis, workers: list[str]) -> dict[str, int]:
    """Write the rows these workers handed to Redis; how many of each (their lists go after commit)."""
    written = {}
    for worker_id in workers:
        rows = {
            (row['job_id'], row['attempt']): row
            for row in map(
                _decode, await cast(Awaitable[list[bytes]], redis.lrange(spill_key(worker_id), 0, -1))
            )
        }
        if rows:
            driver: Any = (await conn.get_raw_connection()).driver_connection
            try:
                async with conn.begin_nested():
                    await driver.execute(UPSERT, *_columns(list(rows.values())))
            except DBAPIError as e:  # rows PostgreSQL will never take: they must not block the rest
                logger.error(
                    'cannot write the %d task records %s handed to Redis, dropped: %s',
                    len(rows),
                    worker_id,
                    e,
                )
        written[worker_id] = len(rows)
    return written


async def _settle(
    conn: AsyncConnection,
    redis: Redis,
    dead: list[str],
    now: datetime,
    outcome: Callable[[JobResult], Outcome],
) -> tuple[int, list[tuple[str, bool]]]:
    """Give the running attempts of ``dead`` the outcome of arq's result, or mark them lost; how many
    got an outcome, and (job_id, latest) of the lost ones."""
    unsettled = [
        (job_id, number) for job_id, number in await conn.execute(UNSETTLED, {'dead': dead, 'now': now})
    ]
    ended = await _results(redis, unsettled)
    if ended:
        outcomes = [outcome(result) for result in ended.values()]
        await conn.execute(
            RECORD_OUTCOMES,
            {
                'job_ids': [job_id for job_id, _ in ended],
                'attempts': [number for _, number in ended],
                'statuses': [status for status, _, _ in outcomes],
                'finished': [result.finish_time for result in ended.values()],
                'errors': [error for _, error, _ in outcomes],
                'results': [_json(value) for _, _, value in outcomes],
            },
        )
    lost = [attempt for attempt in unsettled if attempt not in ended]
    params = {'job_ids': [j for j, _ in lost], 'attempts': [n for _, n in lost], 'now': now}
    return len(ended), [(job_id, latest) for job_id, latest in await conn.execute(MARK_LOST, params)]
