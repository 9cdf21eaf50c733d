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
:attr:`TaskStore.healthy` is false (the worker stops picking jobs). On start-up, and every few
heartbeat intervals after, :meth:`TaskStore.reconcile` marks ``lost`` the attempts left
``running`` by processes that died.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncEngine

from .infrastructure import DATABASE_ERRORS, backoff, describe_error

logger = logging.getLogger('flowworker.store')

Row = dict[str, Any]
MAX_BATCH = 1000
# seconds the flusher waits for more rows before it writes (records lag the jobs by about this)
LINGER = 0.05

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


def _columns(rows: list[Row]) -> list[list[Any]]:
    """The batch as one list per column, results as JSON text."""
    columns = [[row[name] for row in rows] for name in COLUMNS]
    columns[-1] = [None if r is None else json.dumps(r, default=repr) for r in columns[-1]]
    return columns


class TaskStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pending: dict[tuple[str, int], Row] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.healthy = True

    def record(self, row: Row) -> None:
        """Queue ``row`` (a full attempt: every column of ``flow_task_attempts``) for the next write."""
        self._pending[(row['job_id'], row['attempt'])] = row
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """The flusher: write batches until cancelled, reconnecting with back-off."""
        delays = backoff()
        while True:
            try:
                async with self._engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    await self._flush_forever(raw.driver_connection)
            except DATABASE_ERRORS as e:
                delay = next(delays)
                logger.warning(
                    'cannot write %d task records, retrying in %.1fs: %s',
                    len(self._pending),
                    delay,
                    describe_error(e),
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

    async def reconcile(
        self,
        redis: Redis,
        worker_id: str,
        heartbeat_key: Callable[[str], str],
        now: datetime,
        *,
        missing_before: set[str] | None = None,
    ) -> tuple[list[str], set[str]]:
        """Mark ``lost`` the running attempts of workers that are gone.

        At start-up (``missing_before`` None): this id's earlier life and every worker with no
        heartbeat. In a later sweep: the workers with no heartbeat now that had none at the
        previous sweep either (``missing_before``), so a worker that is only re-writing its
        heartbeat after a Redis outage is not taken for dead.

        Returns the jobs whose lost attempt is their latest, which may run again at once, and the
        workers found without a heartbeat (the next sweep's ``missing_before``).
        """
        async with self._engine.begin() as conn:
            running = text("SELECT DISTINCT worker_id FROM flow_task_attempts WHERE status = 'running'")
            owners = (await conn.scalars(running)).all()
            missing = {w for w in owners if w != worker_id and not await redis.exists(heartbeat_key(w))}
            if missing_before is None:
                dead = [w for w in owners if w == worker_id or w in missing]
            else:
                dead = sorted(missing & missing_before)
            if not dead:
                return [], missing
            result = await conn.execute(
                text(
                    "UPDATE flow_task_attempts AS a SET status = 'lost', finished_at = :now, "
                    "error = 'the worker stopped without finishing this attempt (killed or crashed)' "
                    "WHERE status = 'running' AND worker_id IN :dead AND started_at < :now "
                    'RETURNING job_id, NOT EXISTS (SELECT 1 FROM flow_task_attempts AS n '
                    'WHERE n.job_id = a.job_id AND n.attempt > a.attempt) AS latest'
                ).bindparams(bindparam('dead', expanding=True)),
                {'dead': dead, 'now': now},
            )
            rows = result.all()
        if rows:
            logger.warning(
                'marked %d task attempts lost from workers that are gone: %s', len(rows), ', '.join(dead)
            )
        return [job_id for job_id, latest in rows if latest], missing
