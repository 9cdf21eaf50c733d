"""Benchmarks (`make bench`): throughput against bare arq, pick-up latency at idle, memory.

Targets: no-op flows with every task recorded at >= 0.9 x the jobs/s of a bare arq worker with
the same max_jobs on the same Redis; enqueue->start latency p50 <= 50 ms at idle.

Each run uses a real redis-server and PostgreSQL started on free ports, and worker processes as
they run in production. Times come from arq's own job results (enqueue, start and finish times),
the same for both workers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix
from arq.jobs import serialize_job

from tests.servers import PostgresServer, RedisServer, WorkerProcess

QUEUE = 'arq:queue:default'
HERE = Path(__file__).resolve().parent


async def fill_queue(redis: ArqRedis, jobs: int) -> None:
    """Queue ``jobs`` no-op flows the way arq's enqueue_job stores them, in pipelines (fast)."""
    now = int(time.time() * 1000)
    for start in range(0, jobs, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 1000, jobs)):
                job_id = f'bench-{n}'
                pipe.psetex(
                    job_key_prefix + job_id,
                    3_600_000,
                    serialize_job('run_flow', ('demo.echo', {}), {}, None, now),
                )
                pipe.zadd(QUEUE, {job_id: now})
            await pipe.execute()


async def wait_for_results(
    redis: ArqRedis, jobs: int, alive: WorkerProcess, timeout: float = 300
) -> tuple[float, float]:
    """Wait until every job has a result; its first start and last finish (seconds since epoch)."""
    deadline = time.monotonic() + timeout
    while await redis.zcard(QUEUE):
        if not alive.alive() or time.monotonic() > deadline:
            raise RuntimeError(f'the worker did not drain the queue:\n{alive.output()}')
        await asyncio.sleep(0.2)
    results = await redis.all_job_results()
    assert len(results) == jobs, f'{len(results)} results for {jobs} jobs'
    assert all(r.success for r in results)
    return min(r.start_time for r in results).timestamp(), max(r.finish_time for r in results).timestamp()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    return float('nan')


class Bench:
    def __init__(self, redis_server: RedisServer, database: dict[str, str], logs: Path) -> None:
        self.redis_server = redis_server
        self.database = database
        self.logs = logs
        self.env = {
            'REDIS_URL': redis_server.url,
            'DATABASE_URL': database['worker'],
            'DATABASE_POOL_SIZE': '5',
            'DATABASE_MAX_OVERFLOW': '5',
            'LOG_LEVEL': 'WARNING',
            # bench.bare, and a flowworker on PYTHONPATH (a work tree's) before the installed one
            'PYTHONPATH': os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get('PYTHONPATH')])),
        }

    async def fresh(self) -> ArqRedis:
        redis = await create_pool(RedisSettings.from_dsn(self.redis_server.url))
        await redis.flushall()
        db = await asyncpg.connect(self.database['owner'])
        await db.execute('TRUNCATE flow_task_attempts')
        await db.close()
        return redis

    async def throughput(self, kind: str, jobs: int, max_jobs: int) -> tuple[float, float]:
        """jobs/s and peak RSS (MiB) of one worker process draining a full queue."""
        redis = await self.fresh()
        await fill_queue(redis, jobs)
        if kind == 'flowworker':
            worker = WorkerProcess(
                'bench', self.env, ['--max-jobs', str(max_jobs)], self.logs / f'{kind}.log'
            )
        else:
            command = [sys.executable, '-m', 'arq', f'bench.bare.{kind}']
            worker = WorkerProcess(
                'bench', {**self.env, 'BENCH_MAX_JOBS': str(max_jobs)}, [], self.logs / f'{kind}.log', command
            )
        try:
            first, last = await wait_for_results(redis, jobs, alive=worker)
            rss = peak_rss_mib(worker.pid)
            if kind == 'flowworker':
                await self.wait_for_records(jobs)
        finally:
            worker.signal(signal.SIGTERM)
            worker.wait(60)
            await redis.aclose()
        return jobs / (last - first), rss

    async def wait_for_records(self, jobs: int, timeout: float = 60) -> None:
        db = await asyncpg.connect(self.database['owner'])
        try:
            deadline = time.monotonic() + timeout
            while await db.fetchval("SELECT count(*) FROM flow_tasks WHERE status = 'succeeded'") < jobs:
                assert time.monotonic() < deadline, 'task records were not all written'
                await asyncio.sleep(0.1)
        finally:
            await db.close()

    async def latency(self, samples: int, **env: str) -> list[float]:
        """enqueue->start seconds of jobs queued one at a time to an idle worker."""
        redis = await self.fresh()
        worker = WorkerProcess('bench', {**self.env, **env}, [], self.logs / 'latency.log')
        try:
            while not await redis.exists('arq:worker:bench'):
                await asyncio.sleep(0.05)
            delays = []
            for _ in range(samples):
                job = await redis.enqueue_job('run_flow', 'demo.echo', {}, _queue_name=QUEUE)
                assert job is not None
                await job.result(timeout=10, poll_delay=0.01)
                info = await job.result_info()
                assert info is not None
                delays.append((info.start_time - info.enqueue_time).total_seconds())
                await asyncio.sleep(random.uniform(0.05, 0.15))  # idle, at no fixed rhythm with the polls
            return delays
        finally:
            worker.signal(signal.SIGTERM)
            worker.wait(60)
            await redis.aclose()


def idle_cpu_percent(bench: Bench, seconds: float = 5, **env: str) -> float:
    """CPU an idle worker uses, in % of one core."""
    worker = WorkerProcess('idle', {**bench.env, **env}, [], bench.logs / 'idle.log')
    try:
        time.sleep(3)  # start-up is not idling
        ticks = os.sysconf('SC_CLK_TCK')

        def cpu() -> float:
            fields = Path(f'/proc/{worker.pid}/stat').read_text().rsplit(')', 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        before = cpu()
        time.sleep(seconds)
        return 100 * (cpu() - before) / seconds
    finally:
        worker.signal(signal.SIGTERM)
        worker.wait(60)


@contextmanager
def servers(durable: bool = False) -> Iterator[tuple[Path, RedisServer, PostgresServer]]:
    """A redis-server and a PostgreSQL (``durable``: fsync on) in a scratch directory, for one run."""
    directory = Path(tempfile.mkdtemp(prefix='flowworker-bench-'))
    directory.chmod(0o755)
    (directory / 'redis').mkdir()
    redis_server = RedisServer(directory / 'redis')
    postgres_server = PostgresServer(directory / 'pg', durable=durable)
    redis_server.start()
    postgres_server.init()
    postgres_server.start()
    try:
        yield directory, redis_server, postgres_server
    finally:
        redis_server.stop(save=False)
        postgres_server.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def main(jobs: int, max_jobs: int, rounds: int, quick: bool = False) -> int:
    with servers() as (directory, redis_server, postgres_server):
        database = await prepare_database(postgres_server)
        bench = Bench(redis_server, database, directory)
        print(f'{jobs} no-op jobs, max_jobs {max_jobs}, medians of {rounds} rounds')
        rates: dict[str, list[float]] = {}
        rss: dict[str, float] = {}
        for _ in range(rounds):
            for kind in ('fast_poll', 'flowworker') if quick else ('default_poll', 'fast_poll', 'flowworker'):
                rate, peak = await bench.throughput(kind, jobs, max_jobs)
                rates.setdefault(kind, []).append(rate)
                rss[kind] = max(rss.get(kind, 0), peak)
        median = {kind: statistics.median(r) for kind, r in rates.items()}
        labels = {
            'default_poll': 'bare arq, poll_delay 0.5 s (arq default)',
            'fast_poll': 'bare arq, poll_delay 0.01 s',
            'flowworker': 'flowworker, every task recorded',
        }
        for kind, label in labels.items():
            if kind not in median:
                continue
            print(f'  {label:42} {median[kind]:7.0f} jobs/s   peak RSS {rss[kind]:5.1f} MiB')
        ratio = median['flowworker'] / max(median.get('default_poll', 0), median['fast_poll'])
        print(f'  flowworker / best bare arq: {ratio:.2f} (target >= 0.90)')
        if quick:
            return 0 if ratio >= 0.9 else 1

        p50 = report_latency('keyspace events', await bench.latency(200))
        await bench.fresh()
        print(f'idle CPU, keyspace events: {idle_cpu_percent(bench):.2f} % of a core')
        redis = await create_pool(RedisSettings.from_dsn(redis_server.url))
        await redis.config_set('notify-keyspace-events', '')
        await redis.aclose()
        report_latency('polling every 0.05 s', await bench.latency(200))
        print(f'idle CPU, polling every 0.05 s: {idle_cpu_percent(bench):.2f} % of a core')
        return 0 if ratio >= 0.9 and p50 <= 0.05 else 1


def report_latency(mode: str, delays: list[float]) -> float:
    """Print the latency percentiles; the median."""
    p50, p99 = statistics.median(delays), statistics.quantiles(delays, n=100)[98]
    print(
        f'idle pick-up latency, {mode}: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms (target p50 <= 50)'
    )
    return p50


async def prepare_database(server: PostgresServer) -> dict[str, str]:
    conn = await asyncpg.connect(server.dsn())
    await conn.execute("CREATE ROLE bench_owner LOGIN PASSWORD 'owner'")
    await conn.execute("CREATE ROLE bench_worker LOGIN PASSWORD 'worker'")
    await conn.execute('CREATE DATABASE bench OWNER bench_owner')
    await conn.close()
    owner = server.dsn('bench_owner', 'owner', 'bench')
    subprocess.run(
        [sys.executable, '-m', 'flowworker', 'db', 'upgrade', '--grant-to', 'bench_worker'],
        env={**os.environ, 'DATABASE_URL': owner},
        check=True,
        capture_output=True,
    )
    return {'owner': owner, 'worker': server.dsn('bench_worker', 'worker', 'bench')}


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--jobs', type=int, default=10_000)
    parser.add_argument('--max-jobs', type=int, default=10)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument(
        '--quick',
        action='store_true',
        help='throughput against the fast-polling arq only (no latency, idle CPU)',
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.jobs, args.max_jobs, args.rounds, args.quick)))
