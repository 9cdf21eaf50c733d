"""The fleet as an operator sees it: live workers, queues, task rates and task records.

Computed here once; ``flowworker status`` and ``flowworker tasks`` print it, the monitoring service
serves it as JSON, HTML and Prometheus metrics. It only reads:

- workers: the heartbeat keys ``arq:worker:<worker-id>`` (a key exists exactly while its process
  lives), read with SCAN + MGET, never KEYS;
- queues: arq's sorted sets ``arq:queue:<name>`` (``ZCARD``; the guide's ``LLEN`` fails with
  WRONGTYPE), those that exist and those a live worker serves, split by score (the time a job is
  due) and arq's in-progress keys into ready, deferred and in progress, with the age of the
  oldest ready job (what people alert and scale on);
- rates: the task records (``flow_task_attempts``) finished in the last 1, 5 and 15 minutes;
- the last hour minute by minute, the latest failures, and every attempt of one job, from the
  same records.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

from arq.constants import in_progress_key_prefix
from pydantic import BaseModel, Field, ValidationError, computed_field
from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelConnectionPool
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncEngine

from . import heartbeat
from .schema import Status
from .settings import QUEUE_KEY_PREFIX

logger = logging.getLogger('flowworker.fleet')

# the windows rates are given for: name -> seconds
WINDOWS = {'1m': 60, '5m': 300, '15m': 900}
# the attempt statuses rates count: a job's end
RATE_STATUSES = ('succeeded', 'failed', 'cancelled')
SCAN_COUNT = 500
# the span of the per-minute counts (the /workers page's charts), in minutes
MINUTES = 60


class Worker(BaseModel):
    """One live worker process, from its heartbeat."""

    worker_id: str
    host: str
    pid: int
    queue: str
    state: str = Field(description='running, or draining (picks no more jobs)')
    database: str = Field(description='ok, or unreachable (the worker picks no jobs meanwhile)')
    max_jobs: int
    running: int = Field(description='jobs running now')
    completed: int = Field(description='jobs this process completed since it started')
    failed: int = Field(description='jobs this process failed (or cancelled) since it started')
    retried: int
    version: str
    started_at: datetime
    beat_at: datetime
    heartbeat_age: float = Field(description='seconds since the last heartbeat')


class Queue(BaseModel):
    name: str
    key: str = Field(description='the Redis sorted set, arq:queue:<name>')
    length: int = Field(description='ZCARD: jobs queued, deferred or running')
    deferred: int = Field(description='jobs not due yet (retries waiting, _defer_by)')
    ready: int = Field(description='jobs due and not in progress: what a free worker picks next')
    oldest_ready_age: float | None = Field(
        description='seconds the oldest ready job has been due (null: none ready)'
    )
    running: int = Field(description="jobs running, from the workers' heartbeats")
    workers: int = Field(description='live workers on the queue')
    picking: int = Field(description='live workers on the queue that pick jobs (state running)')

    @computed_field  # type: ignore[prop-decorator]
    @property
    def stranded(self) -> bool:
        """Jobs are waiting and no live worker will pick them."""
        return self.length > 0 and self.picking == 0


class Rate(BaseModel):
    """All flows, one window."""

    window: str
    seconds: int
    succeeded: int
    failed: int
    cancelled: int
    completion_rate: float = Field(description='succeeded per second')
    failure_rate: float | None = Field(description='failed / (succeeded + failed); null when neither')


class RedisNode(BaseModel):
    """The Redis the fleet's queues are on now."""

    address: str = Field(description='host:port (or the socket path) of the Redis in use')
    sentinels: bool = Field(description='named by the sentinels: the master now, after any failover')


class Fleet(BaseModel):
    at: datetime
    redis: RedisNode
    workers: list[Worker]
    queues: list[Queue]
    rates: list[Rate]

    @property
    def stranded(self) -> list[Queue]:
        return [queue for queue in self.queues if queue.stranded]


class Task(BaseModel):
    """One attempt of a job: :func:`tasks` lists each job's latest (view ``flow_tasks``),
    :func:`attempts` every attempt of one job."""

    job_id: str
    attempt: int
    flow: str
    queue: str
    status: Status
    worker_id: str
    enqueued_at: datetime | None
    started_at: datetime
    finished_at: datetime | None
    runtime: float = Field(description='seconds from start to end, or to now while it runs')
    error: str | None
    result: Any = None


class Minute(BaseModel):
    """The attempts that ended in one minute of the last hour."""

    minutes_ago: int = Field(description='0: the last 60 seconds, 1: the 60 before them, ...')
    succeeded: int
    failed: int


# attempts that ended in each window: a row per window, flow and status (windows in seconds); the
# longest window is read once, through the finished_at index, and counted for each window
RATES = text("""
SELECT w.secs, a.status, count(*)
FROM (SELECT status, finished_at FROM flow_task_attempts
      WHERE finished_at > now() - make_interval(secs => CAST(:longest AS integer))
        AND status = ANY(CAST(:statuses AS text[]))) AS a
JOIN unnest(CAST(:windows AS integer[])) AS w(secs) ON a.finished_at > now() - make_interval(secs => w.secs)
GROUP BY w.secs, a.status
""")
# the last hour's ended attempts by minute counted back from now (0: the last 60 s), so that every
# bucket is a whole minute; read through the finished_at index (a clock ahead of the database's
# counts as minute 0)
PER_MINUTE = text("""
SELECT greatest(floor(extract(epoch FROM now() - finished_at) / 60), 0)::integer AS minutes_ago,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM flow_task_attempts
WHERE finished_at > now() - make_interval(mins => CAST(:minutes AS integer))
  AND status IN ('succeeded', 'failed')
GROUP BY 1
""")
# a Task's columns, from flow_task_attempts
TASK_COLUMNS = """job_id, attempt, flow, queue, status, worker_id, enqueued_at, started_at, finished_at,
       extract(epoch FROM coalesce(finished_at, now()) - started_at)::float8 AS runtime, error, result"""
# jobs whose latest attempt (what the view flow_tasks shows) matches whichever of status, flow and
# age are given: filtered first, then checked for a later attempt, rather than the whole view built
TASKS = text(f"""
SELECT {TASK_COLUMNS}
FROM flow_task_attempts AS a
WHERE (CAST(:status AS text) IS NULL OR status = CAST(:status AS text))
  AND (CAST(:flow AS text) IS NULL OR flow = CAST(:flow AS text))
  AND (CAST(:older_than AS float8) IS NULL
       OR started_at < now() - make_interval(secs => CAST(:older_than AS float8)))
  AND NOT EXISTS (SELECT 1 FROM flow_task_attempts AS n WHERE n.job_id = a.job_id AND n.attempt > a.attempt)
ORDER BY started_at DESC, job_id
LIMIT :limit
""")  # noqa: S608
# the latest attempts that failed for good, through the partial index flow_task_attempts_failed
FAILURES = text(f"""
SELECT {TASK_COLUMNS}
FROM flow_task_attempts WHERE status = 'failed' ORDER BY finished_at DESC, job_id LIMIT :limit
""")  # noqa: S608
# every attempt of one job, through the primary key
ATTEMPTS = text(f"""
SELECT {TASK_COLUMNS}
FROM flow_task_attempts WHERE job_id = :job_id ORDER BY attempt
""")  # noqa: S608


async def _scan(redis: Redis, pattern: str, type_: str | None = None) -> list[str]:
    keys = [key.decode() async for key in redis.scan_iter(match=pattern, count=SCAN_COUNT, _type=type_)]
    return sorted(keys)


def _worker(raw: bytes, now: datetime) -> Worker:
    beat = json.loads(raw)
    beat_at = datetime.fromisoformat(beat['beat_at'])
    return Worker(
        **{k: v for k, v in beat.items() if k != 'jobs'},
        **beat['jobs'],
        heartbeat_age=max((now - beat_at).total_seconds(), 0.0),
    )


async def workers(redis: Redis) -> list[Worker]:
    """The live worker processes, by worker id."""
    now = datetime.now(UTC)
    found = []
    for worker_id, raw in (await heartbeat.beats(redis)).items():
        try:
            found.append(_worker(raw, now))
        except (ValueError, KeyError, TypeError, ValidationError) as e:
            logger.warning(
                'ignoring heartbeat %s that is not a flowworker heartbeat: %s',
                heartbeat.heartbeat_key(worker_id),
                e,
            )
    return found


async def queues(redis: Redis, live: list[Worker]) -> list[Queue]:
    """Every queue that has jobs or a live worker."""
    names = sorted(
        {key.removeprefix(QUEUE_KEY_PREFIX) for key in await _scan(redis, QUEUE_KEY_PREFIX + '*', 'zset')}
        | {worker.queue for worker in live}
    )
    # the jobs some worker runs now, whatever their queue (as many as the fleet's running jobs)
    running_ids = [
        key.removeprefix(in_progress_key_prefix) for key in await _scan(redis, in_progress_key_prefix + '*')
    ]
    now_ms = int(time.time() * 1000)
    # one snapshot of every queue: the counts, and the due jobs in score order as far as past the
    # running ones (no more than run, whatever their queue)
    async with redis.pipeline(transaction=True) as pipe:
        for name in names:
            key = QUEUE_KEY_PREFIX + name
            pipe.zcard(key)
            pipe.zcount(key, f'({now_ms}', '+inf')
            pipe.zrangebyscore(key, '-inf', now_ms, start=0, num=len(running_ids) + 1, withscores=True)
            pipe.zcount(key, '-inf', now_ms)
            if running_ids:
                pipe.zmscore(key, running_ids)
        counts = await pipe.execute()
    per_queue = 5 if running_ids else 4
    result = []
    for i, name in enumerate(names):
        length, deferred, first_due, due, *scores = counts[per_queue * i : per_queue * (i + 1)]
        due_running = {
            job
            for job, score in zip(running_ids, scores[0] if scores else [], strict=False)
            if score is not None and score <= now_ms
        }
        on_queue = [worker for worker in live if worker.queue == name]
        result.append(
            Queue(
                name=name,
                key=QUEUE_KEY_PREFIX + name,
                length=length,
                deferred=deferred,
                ready=max(due - len(due_running), 0),
                oldest_ready_age=_oldest_ready_age(first_due, due_running, now_ms),
                running=sum(worker.running for worker in on_queue),
                workers=len(on_queue),
                picking=sum(worker.state == 'running' for worker in on_queue),
            )
        )
    return result


def _oldest_ready_age(first_due: list[tuple[bytes, float]], running: set[str], now_ms: int) -> float | None:
    """Seconds since the first due job that no worker runs became due (None: none is ready)."""
    for member, score in first_due:
        if member.decode() not in running:
            return max(now_ms - float(score), 0.0) / 1000
    return None


async def rates(engine: AsyncEngine) -> list[Rate]:
    """Attempts of every flow that ended in each window."""
    params = {
        'windows': list(WINDOWS.values()),
        'longest': max(WINDOWS.values()),
        'statuses': list(RATE_STATUSES),
    }
    async with engine.connect() as conn:
        rows = (await conn.execute(RATES, params)).all()
    counts = {seconds: dict.fromkeys(RATE_STATUSES, 0) for seconds in WINDOWS.values()}
    for seconds, status, count in rows:
        counts[seconds][status] = count
    found = []
    for window, seconds in WINDOWS.items():
        total = counts[seconds]
        ended = total['succeeded'] + total['failed']
        found.append(
            Rate(
                window=window,
                seconds=seconds,
                **total,
                completion_rate=total['succeeded'] / seconds,
                failure_rate=total['failed'] / ended if ended else None,
            )
        )
    return found


async def redis_node(redis: Redis) -> RedisNode:
    """Which Redis ``redis`` uses: with sentinels, the master they name now (asked anew)."""
    pool = redis.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]  # redis-py is partly typed
        return RedisNode(address=f'{host}:{port}', sentinels=True)
    given = pool.connection_kwargs
    where = (
        given['path'] if 'path' in given else f'{given.get("host", "localhost")}:{given.get("port", 6379)}'
    )
    return RedisNode(address=where, sentinels=False)


async def fleet(redis: Redis, engine: AsyncEngine) -> Fleet:
    live = await workers(redis)
    return Fleet(
        at=datetime.now(UTC),
        redis=await redis_node(redis),
        workers=live,
        queues=await queues(redis, live),
        rates=await rates(engine),
    )


DURATION = re.compile(r'^(\d+(?:\.\d+)?)([smhd]?)$')
UNITS = {'': 1, 's': 1, 'm': 60, 'h': 3600, 'd': 86400}


def parse_duration(value: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` as seconds."""
    match = DURATION.match(value.strip())
    if not match:
        raise ValueError(f'{value!r} is not a duration: a number with s, m, h or d, e.g. 10m')
    return float(match[1]) * UNITS[match[2]]


async def tasks(
    engine: AsyncEngine,
    *,
    status: str | None = None,
    flow: str | None = None,
    older_than: float | None = None,
    limit: int = 50,
) -> list[Task]:
    """Jobs (their latest attempt), newest first; ``older_than``: started more than that many seconds ago."""
    params = {'status': status, 'flow': flow, 'older_than': older_than, 'limit': limit}
    return await _read_tasks(engine, TASKS, params)


async def _read_tasks(engine: AsyncEngine, query: TextClause, params: dict[str, Any]) -> list[Task]:
    async with engine.connect() as conn:
        rows = (await conn.execute(query, params)).mappings().all()
    return [Task(**row) for row in rows]


async def failures(engine: AsyncEngine, limit: int = 20) -> list[Task]:
    """The latest attempts that failed for good, newest first."""
    return await _read_tasks(engine, FAILURES, {'limit': limit})


async def attempts(engine: AsyncEngine, job_id: str) -> list[Task]:
    """Every attempt of ``job_id``, first first (none: the job has no record)."""
    return await _read_tasks(engine, ATTEMPTS, {'job_id': job_id})


async def per_minute(engine: AsyncEngine) -> list[Minute]:
    """The attempts that succeeded and failed in each of the last :data:`MINUTES` minutes, oldest first."""
    async with engine.connect() as conn:
        rows = (await conn.execute(PER_MINUTE, {'minutes': MINUTES})).mappings().all()
    found = {minute.minutes_ago: minute for minute in (Minute(**row) for row in rows)}
    return [
        found.get(ago, Minute(minutes_ago=ago, succeeded=0, failed=0)) for ago in reversed(range(MINUTES))
    ]
