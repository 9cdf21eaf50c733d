"""Benchmark of the task records at scale (`make bench`): read paths on millions of attempts, and prune.

Fills ``flow_task_attempts`` with generated rows (default 5 million: 60 days of jobs, 90 % succeeded,
5 % failed, 1 % cancelled, 4 % with a lost or retrying first attempt and a second one, a few still
running) in a PostgreSQL with production durability (fsync on), then times what operators and the
monitor read — ``flowworker status`` and ``/metrics`` (one fleet read), ``flowworker tasks`` and
``/api/v1/task_queue/tasks`` with each filter, the ``/workers`` page's charts of the last hour and
latest failures, a job's attempts (``/tasks/<job>`` and its API) — in process and over HTTP from a
real ``flowworker monitor``, medians of 5; and ``flowworker db prune --older-than 30d`` (rows/s).
Target: every read under a second at 5 million attempts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx

from flowworker import fleet
from flowworker.infrastructure import create_engine, create_redis
from flowworker.settings import load_settings
from tests.monitoring import MonitorProcess

from .bench import prepare_database, servers

ROUNDS = 5
TARGET = 1.0
# the first attempts, one per job; started_at spread evenly over the last DAYS days
FILL = """
INSERT INTO flow_task_attempts (job_id, attempt, flow, queue, status, worker_id, enqueued_at,
                                started_at, finished_at, error, result)
SELECT 'gen-' || g, 1, 'flow.' || g % 10, 'default',
       CASE WHEN g % 100 < 90 THEN 'succeeded' WHEN g % 100 < 95 THEN 'failed'
            WHEN g % 100 < 96 THEN 'cancelled' WHEN g % 100 < 98 THEN 'lost' ELSE 'retrying' END,
       'host-' || g % 20 || '-default-' || g % 4, t - interval '5 ms', t, t + interval '20 ms',
       CASE WHEN g % 100 BETWEEN 90 AND 94 THEN 'ValueError: generated' END,
       CASE WHEN g % 100 < 90 THEN '{"ok": true}'::jsonb END
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT now() - (($3::bigint - g)::float8 / $3::bigint) * make_interval(days => $4::int)) AS s(t)
"""
# the second attempt of the jobs whose first was lost or asked for a retry
SECOND = """
INSERT INTO flow_task_attempts (job_id, attempt, flow, queue, status, worker_id, enqueued_at,
                                started_at, finished_at, error, result)
SELECT job_id, 2, flow, queue, 'succeeded', worker_id, enqueued_at, finished_at + interval '1 ms',
       finished_at + interval '30 ms', NULL, '{"ok": true}'::jsonb
FROM flow_task_attempts WHERE attempt = 1 AND status IN ('lost', 'retrying')
"""
RUNNING = """
INSERT INTO flow_task_attempts (job_id, attempt, flow, queue, status, worker_id, enqueued_at, started_at)
SELECT 'running-' || g, 1, 'flow.1', 'default', 'running', 'host-1-default-1', t, t
FROM generate_series(1, 40) AS g, LATERAL (SELECT now() - g * interval '1 minute') AS s(t)
"""
CHUNK = 500_000
# a job whose first attempt was lost and whose second succeeded (g % 100 == 97 in FILL)
RETRIED_JOB = 'gen-97'


async def fill(owner_url: str, attempts: int, days: int) -> int:
    conn = await asyncpg.connect(owner_url)
    try:
        jobs = round(attempts / 1.04)
        for start in range(1, jobs + 1, CHUNK):
            await conn.execute(FILL, start, min(start + CHUNK - 1, jobs), jobs, days)
            print(f'  {min(start + CHUNK - 1, jobs):>9} jobs', flush=True)
        await conn.execute(SECOND)
        await conn.execute(RUNNING)
        await conn.execute('VACUUM ANALYZE flow_task_attempts')
        return int(await conn.fetchval('SELECT count(*) FROM flow_task_attempts'))
    finally:
        await conn.close()


async def median_seconds(read: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        await read()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def reads(env: dict[str, str], monitor: MonitorProcess) -> list[tuple[str, float]]:
    settings = load_settings(None, database_url=env['DATABASE_URL'], redis_url=env['REDIS_URL'])
    engine, redis = create_engine(settings), await create_redis(settings)
    cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ('flowworker status (rates of 1/5/15 min)', lambda: fleet.fleet(redis, engine)),
        ('flowworker tasks', lambda: fleet.tasks(engine)),
        ('flowworker tasks --status failed', lambda: fleet.tasks(engine, status='failed')),
        (
            'flowworker tasks --status running --older-than 10m',
            lambda: fleet.tasks(engine, status='running', older_than=600),
        ),
        ('flowworker tasks --status interrupted (none)', lambda: fleet.tasks(engine, status='interrupted')),
        ('flowworker tasks --flow flow.3', lambda: fleet.tasks(engine, flow='flow.3')),
        ('flowworker tasks --older-than 7d', lambda: fleet.tasks(engine, older_than=7 * 86400)),
        ('the last hour per minute (/workers charts)', lambda: fleet.per_minute(engine)),
        ('the latest 20 failures (/workers)', lambda: fleet.failures(engine)),
        (f'the attempts of {RETRIED_JOB}', lambda: fleet.attempts(engine, RETRIED_JOB)),
    ]
    try:
        timed = [(name, await median_seconds(read)) for name, read in cases]
    finally:
        await redis.aclose(close_connection_pool=True)
        await engine.dispose()
    async with httpx.AsyncClient(base_url=monitor.url, timeout=60) as client:

        def get(path: str) -> Callable[[], Awaitable[httpx.Response]]:
            async def call() -> httpx.Response:
                response = await client.get(path)
                response.raise_for_status()
                return response

            return call

        for path in (
            '/metrics',
            '/api/v1/task_queue/tasks',
            '/api/v1/task_queue/tasks?status=failed',
            '/api/v1/task_queue/queues',
            '/workers',
            f'/tasks/{RETRIED_JOB}',
            f'/api/v1/task_queue/tasks/{RETRIED_JOB}',
        ):
            timed.append((f'GET {path}', await median_seconds(get(path))))
    return timed


def prune(owner_url: str, older_than: str, batch: int) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            '-m',
            'flowworker',
            'db',
            'prune',
            '--older-than',
            older_than,
            '--batch',
            str(batch),
        ],
        env={**os.environ, 'DATABASE_URL': owner_url},
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - start, done.stdout.strip()


async def main(attempts: int, days: int, batch: int) -> int:
    with servers(durable=True) as (directory, redis_server, postgres):
        database = await prepare_database(postgres)
        print(f'filling flow_task_attempts with {attempts:,} attempts over {days} days (fsync on)')
        rows = await fill(database['owner'], attempts, days)
        env = {'DATABASE_URL': database['worker'], 'REDIS_URL': redis_server.url}
        with MonitorProcess(env, directory) as monitor:
            timed = await reads(env, monitor)
        print(f'\n{rows:,} attempts; medians of {ROUNDS}, target under {TARGET:g} s each')
        print('| read | seconds |\n|---|---|')
        for name, seconds in timed:
            print(f'| {name} | {seconds:.3f} |')
        conn = await asyncpg.connect(database['owner'])
        before = int(await conn.fetchval('SELECT count(*) FROM flow_task_attempts'))
        seconds, said = prune(database['owner'], '30d', batch)
        after = int(await conn.fetchval('SELECT count(*) FROM flow_task_attempts'))
        await conn.close()
        print(f'\nflowworker db prune --older-than 30d --batch {batch}: {said}')
        print(f'{before - after:,} attempts in {seconds:.1f} s: {(before - after) / seconds:,.0f} attempts/s')
        slow = [name for name, seconds in timed if seconds >= TARGET]
        if slow:
            print(f'over {TARGET:g} s: {", ".join(slow)}')
        return 1 if slow else 0


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--attempts', type=int, default=5_000_000, help='rows to generate (5 000 000)')
    parser.add_argument('--days', type=int, default=60, help='the days they span (60)')
    parser.add_argument('--batch', type=int, default=5000, help="prune's --batch (5000)")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.attempts, args.days, args.batch)))
