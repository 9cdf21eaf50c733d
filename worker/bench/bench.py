"""Benchmarks (`make bench`): throughput, CPU per job and memory against bare arq and the peers
(SAQ, Dramatiq, Celery, RQ: bench/peers.py), pick-up latency at idle and under load.

Targets: flows with every task recorded at >= 1.5 x the jobs/s of the best bare arq worker with
the same max_jobs on the same Redis, and at least every peer's; enqueue->start latency at idle
p50 <= 2 ms and p99 <= 5 ms, at < 0.5 % of a core while idle. Under load (a producer enqueuing
at half flowworker's drain rate) the latency is reported, with no target.

Each run uses a real redis-server and a PostgreSQL with production durability (fsync and
synchronous_commit on) started on free ports, and worker processes as they run in production.
Every worker drains the same number of prefilled jobs, each one Redis INCR of a counter, from one
process; the bench reads the counter, and the worker's CPU (user + sys) and peak RSS from /proc.
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
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import deserialize_result, serialize_job

from tests.servers import WORKER_ROOT, PostgresServer, RedisServer, WorkerProcess

from .peers import COUNTER, PEERS

QUEUE = 'arq:queue:default'
HERE = Path(__file__).resolve().parent
# where `make bench` installs the peers (bench/peers.txt), apart from the worker's venv
PEER_PYTHON = WORKER_ROOT.parent / 'build' / 'bench-venv' / 'bin' / 'python'
# the workers from this venv, as the table names them; the peers' come from PEERS
OURS = {
    'default_poll': 'bare arq, poll_delay 0.5 s (arq default), max_jobs {concurrency}',
    'fast_poll': 'bare arq, poll_delay 0.01 s, max_jobs {concurrency}',
    'flowworker': 'flowworker, every task recorded, max_jobs {concurrency}',
}
# how often the bench reads the counter while a worker drains its queue (seconds)
COUNT_EVERY = 0.005
# the targets (see above)
TARGET_RATIO_TO_ARQ = 1.5
TARGET_IDLE_P50, TARGET_IDLE_P99, TARGET_IDLE_CPU = 0.002, 0.005, 0.5


async def fill_queue(redis: ArqRedis, jobs: int) -> None:
    """Queue ``jobs`` bench.incr flows the way arq's enqueue_job stores them, in pipelines (fast)."""
    now = int(time.time() * 1000)
    for start in range(0, jobs, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 1000, jobs)):
                job_id = f'bench-{n}'
                pipe.psetex(
                    job_key_prefix + job_id,
                    3_600_000,
                    serialize_job('run_flow', ('bench.incr', {}), {}, None, now),
                )
                pipe.zadd(QUEUE, {job_id: now})
            await pipe.execute()


async def count_to(redis: ArqRedis, jobs: int, worker: WorkerProcess, timeout: float = 600) -> float:
    """Wait until ``jobs`` jobs have made their INCR; the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while int(await redis.get(COUNTER) or 0) < jobs:
        if not worker.alive() or time.monotonic() > deadline:
            raise RuntimeError(f'the worker did not drain its queue:\n{worker.output()}')
        await asyncio.sleep(COUNT_EVERY)
    return time.monotonic()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def peak_rss_mib(pid: int) -> float:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    return float('nan')


@dataclass
class Drained:
    """One worker process draining a full queue."""

    rate: float  # jobs/s from the first job's INCR to the last's
    cpu_ms: float  # the process's CPU per job over that span (flowworker: until its records are written)
    rss: float  # peak RSS, MiB
    again: int  # INCRs beyond one per job: jobs run twice (at-least-once delivery under load)


class Bench:
    def __init__(
        self, redis_server: RedisServer, database: dict[str, str], logs: Path, peer_python: Path
    ) -> None:
        self.redis_server = redis_server
        self.database = database
        self.logs = logs
        self.peer_python = peer_python
        self.env = {
            'REDIS_URL': redis_server.url,
            'DATABASE_URL': database['worker'],
            'DATABASE_POOL_SIZE': '5',
            'DATABASE_MAX_OVERFLOW': '5',
            'LOG_LEVEL': 'WARNING',
            # bench.* importable, and the caller's PYTHONPATH (a worktree's src) kept
            'PYTHONPATH': os.pathsep.join([str(HERE.parent), *filter(None, [os.environ.get('PYTHONPATH')])]),
        }

    async def fresh(self) -> ArqRedis:
        redis = await create_pool(RedisSettings.from_dsn(self.redis_server.url))
        await redis.flushall()
        db = await asyncpg.connect(self.database['owner'])
        await db.execute('TRUNCATE flow_task_attempts')
        await db.close()
        return redis

    async def throughput(self, kind: str, jobs: int, max_jobs: int) -> Drained:
        """One worker process of ``kind`` draining ``jobs`` prefilled jobs."""
        redis = await self.fresh()
        log = self.logs / f'{kind}.log'
        if kind in PEERS:
            peer = [str(self.peer_python), '-m', 'bench.peers']
            subprocess.run(
                [*peer, 'fill', kind, str(jobs)], env={**os.environ, **self.env}, cwd=WORKER_ROOT, check=True
            )
            worker = WorkerProcess('bench', self.env, [], log, [*peer, 'work', kind, str(max_jobs)])
        else:
            await fill_queue(redis, jobs)
            if kind == 'flowworker':
                env = {**self.env, 'FLOWWORKER_FLOW_MODULES': 'bench.flows'}
                worker = WorkerProcess('bench', env, ['--max-jobs', str(max_jobs)], log)
            else:
                command = [sys.executable, '-m', 'arq', f'bench.bare.{kind}']
                worker = WorkerProcess(
                    'bench', {**self.env, 'BENCH_MAX_JOBS': str(max_jobs)}, [], log, command
                )
        try:
            first = await count_to(redis, 1, worker)
            cpu_first = cpu_seconds(worker.pid)
            last = await count_to(redis, jobs, worker)
            if kind == 'flowworker':
                await self.wait_for_records(jobs)
            cpu_ms = 1000 * (cpu_seconds(worker.pid) - cpu_first) / jobs
            rss = peak_rss_mib(worker.pid)
            again = int(await redis.get(COUNTER) or 0) - jobs
        finally:
            worker.signal(signal.SIGTERM)
            worker.wait(60)
            await redis.aclose()
        return Drained(jobs / (last - first), cpu_ms, rss, again)

    async def wait_for_records(self, jobs: int, timeout: float = 60) -> None:
        db = await asyncpg.connect(self.database['owner'])
        try:
            deadline = time.monotonic() + timeout
            while await db.fetchval("SELECT count(*) FROM flow_tasks WHERE status = 'succeeded'") < jobs:
                assert time.monotonic() < deadline, 'task records were not all written'
                await asyncio.sleep(0.1)
        finally:
            await db.close()

    async def latency(self, samples: int) -> list[float]:
        """enqueue->start seconds of jobs queued one at a time to an idle worker."""
        redis = await self.fresh()
        worker = WorkerProcess('bench', self.env, [], self.logs / 'latency.log')
        try:
            await started(redis)
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

    async def loaded_latency(self, rate: float, seconds: float, max_jobs: int) -> list[float]:
        """enqueue->start seconds of the jobs a plain arq producer queues at ``rate`` jobs/s, each
        at its own time (not in bursts), for ``seconds`` to a busy worker."""
        redis = await self.fresh()
        env = {**self.env, 'FLOWWORKER_FLOW_MODULES': 'bench.flows'}
        worker = WorkerProcess('bench', env, ['--max-jobs', str(max_jobs)], self.logs / 'loaded.log')
        try:
            await started(redis)
            jobs = int(rate * seconds)
            start = time.monotonic()
            enqueued = []
            for n in range(jobs):
                await asyncio.sleep(max(start + n / rate - time.monotonic(), 0))
                enqueued.append(
                    asyncio.create_task(redis.enqueue_job('run_flow', 'bench.incr', {}, _queue_name=QUEUE))
                )
            ids = [job.job_id for job in await asyncio.gather(*enqueued) if job is not None]
            await count_to(redis, jobs, worker)
            await self.wait_for_records(jobs)
            results = await redis.mget([result_key_prefix + job_id for job_id in ids])
            delays = []
            for data in results:
                assert data is not None, 'a job has no result'
                result = deserialize_result(data)
                delays.append((result.start_time - result.enqueue_time).total_seconds())
            return delays
        finally:
            worker.signal(signal.SIGTERM)
            worker.wait(60)
            await redis.aclose()


async def started(redis: ArqRedis) -> None:
    """Wait for the bench worker's heartbeat: it polls its queue."""
    while not await redis.exists('arq:worker:bench'):
        await asyncio.sleep(0.05)


def idle_cpu_percent(bench: Bench, seconds: float = 5) -> float:
    """CPU an idle worker uses, in % of one core."""
    worker = WorkerProcess('idle', bench.env, [], bench.logs / 'idle.log')
    try:
        time.sleep(3)  # start-up is not idling
        before = cpu_seconds(worker.pid)
        time.sleep(seconds)
        return 100 * (cpu_seconds(worker.pid) - before) / seconds
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


async def main(jobs: int, max_jobs: int, rounds: int, peer_python: Path, peers: bool) -> int:
    with servers(durable=True) as (directory, redis_server, postgres_server):
        database = await prepare_database(postgres_server)
        db = await asyncpg.connect(database['owner'])
        for setting in ('fsync', 'synchronous_commit'):
            assert await db.fetchval(f'SHOW {setting}') == 'on', f'PostgreSQL runs with {setting} off'
        await db.close()
        bench = Bench(redis_server, database, directory, peer_python)
        kinds = [*OURS, *(PEERS if peers else ())]
        print(f'{jobs} jobs of one INCR each, max_jobs {max_jobs}, medians of {rounds} rounds', flush=True)
        runs: dict[str, list[Drained]] = {kind: [] for kind in kinds}
        for n in range(rounds):
            for kind in kinds:
                runs[kind].append(run := await bench.throughput(kind, jobs, max_jobs))
                print(
                    f'  round {n + 1} {kind:15} {run.rate:7.0f} jobs/s {run.cpu_ms:6.3f} CPU ms/job'
                    + (f', {run.again} jobs run twice' if run.again else ''),
                    flush=True,
                )
        # the medians; the jobs run twice summed over the rounds
        median = {
            kind: Drained(
                statistics.median(run.rate for run in r),
                statistics.median(run.cpu_ms for run in r),
                statistics.median(run.rss for run in r),
                sum(run.again for run in r),
            )
            for kind, r in runs.items()
        }
        ours = median['flowworker'].rate
        ratio = ours / max(median['default_poll'].rate, median['fast_poll'].rate)
        ahead = all(ours >= median[kind].rate for kind in PEERS if kind in median)
        met = report(f'flowworker / best bare arq: {ratio:.2f}', ratio >= TARGET_RATIO_TO_ARQ)
        if peers:
            met &= report('flowworker ahead of every peer', ahead)

        line, (p50, p99) = latency('idle pick-up latency, keyspace events', await bench.latency(500))
        met &= report(line, p50 <= TARGET_IDLE_P50 and p99 <= TARGET_IDLE_P99)
        await bench.fresh()
        cpu = idle_cpu_percent(bench)
        met &= report(f'idle CPU, keyspace events: {cpu:.2f} % of a core', cpu < TARGET_IDLE_CPU)
        rate = ours / 2
        print(
            latency(
                f'pick-up latency under load ({rate:.0f} jobs/s)',
                await bench.loaded_latency(rate, 10, max_jobs),
            )[0]
        )
        redis = await create_pool(RedisSettings.from_dsn(redis_server.url))
        await redis.config_set('notify-keyspace-events', '')
        await redis.aclose()
        print(latency('idle pick-up latency, polling every 0.05 s', await bench.latency(200))[0])
        print(f'idle CPU, polling every 0.05 s: {idle_cpu_percent(bench):.2f} % of a core')
        print_table(median, max_jobs)
        return 0 if met else 1


def report(measure: str, met: bool) -> bool:
    """Print a measure against its target (see above); whether it was met."""
    print(f'  {measure}: {"met" if met else "MISSED"} (targets: bench/bench.py)', flush=True)
    return met


def latency(what: str, delays: list[float]) -> tuple[str, tuple[float, float]]:
    """A line with the p50 and p99 of ``delays``, and the two."""
    p50, p99 = statistics.median(delays), statistics.quantiles(delays, n=100)[98]
    return f'{what}: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms', (p50, p99)


def print_table(median: dict[str, Drained], max_jobs: int) -> None:
    """The throughput medians as a Markdown table, each with its ratio to flowworker's."""
    ours = median['flowworker']
    print('\n| worker, one process | jobs/s | CPU ms/job | peak RSS MiB |\n|---|---|---|---|')
    for kind, run in median.items():
        label = {**OURS, **PEERS}[kind].format(concurrency=max_jobs)
        label += f' ({run.again} jobs run twice, all rounds)' if run.again else ''
        cells = [f'{run.rate:,.0f}', f'{run.cpu_ms:.3f}', f'{run.rss:.0f}']
        ratios = [run.rate / ours.rate, run.cpu_ms / ours.cpu_ms, run.rss / ours.rss]
        print(f'| {label} |', ' | '.join(f'{c} ({r:.2f} x)' for c, r in zip(cells, ratios, strict=True)), '|')


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
        '--peer-python', type=Path, default=PEER_PYTHON, help="the peers' python (make bench installs it)"
    )
    parser.add_argument('--no-peers', action='store_true', help='time flowworker and bare arq only')
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.jobs, args.max_jobs, args.rounds, args.peer_python, not args.no_peers)))
