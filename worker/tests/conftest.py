"""Fixtures: a real redis-server and PostgreSQL for the session, a clean slate for each test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis

from flowworker.schema import FINAL_STATUSES

from .monitoring import TOKEN, MonitorProcess
from .servers import PostgresServer, RedisServer, WorkerProcess

TESTS = Path(__file__).resolve().parent
OWNER, OWNER_PASSWORD = 'flowworker_owner', 'owner-secret'
WORKER, WORKER_PASSWORD = 'flowworker_worker', 'worker-secret'
DATABASE = 'flowworker'
QUEUE = 'arq:queue:default'


@pytest.fixture(scope='session')
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp('redis'))
    server.start()
    yield server
    server.stop(save=False)


@pytest.fixture(scope='session')
def postgres_server() -> Iterator[PostgresServer]:
    # not under pytest's tmp dir: the postgres user must be able to reach it
    directory = Path(tempfile.mkdtemp(prefix='flowworker-pg-'))
    directory.chmod(0o755)
    server = PostgresServer(directory / 'pg')
    server.init()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def flowworker(
    *args: str, env: dict[str, str], inherit: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``flowworker`` command with ``env`` added to this environment (or to a bare PATH)."""
    return subprocess.run(
        [sys.executable, '-m', 'flowworker', *args],
        env={**(os.environ if inherit else {'PATH': '/usr/bin:/bin'}), **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope='session')
def database(postgres_server: PostgresServer) -> dict[str, str]:
    """A database owned by a schema owner, the schema migrated, and a worker role with DML rights only."""

    async def create() -> None:
        conn = await asyncpg.connect(postgres_server.dsn())
        try:
            await conn.execute(f"CREATE ROLE {OWNER} LOGIN PASSWORD '{OWNER_PASSWORD}'")
            await conn.execute(f"CREATE ROLE {WORKER} LOGIN PASSWORD '{WORKER_PASSWORD}'")
            await conn.execute(f'CREATE DATABASE {DATABASE} OWNER {OWNER}')
        finally:
            await conn.close()

    asyncio.run(create())
    owner_url = postgres_server.dsn(OWNER, OWNER_PASSWORD, DATABASE)
    upgraded = flowworker('db', 'upgrade', '--grant-to', WORKER, env={'DATABASE_URL': owner_url})
    assert upgraded.returncode == 0, upgraded.stderr
    return {'owner': owner_url, 'worker': postgres_server.dsn(WORKER, WORKER_PASSWORD, DATABASE)}


class Stack:
    """A test's handles on the real servers: Redis, PostgreSQL (as owner), an arq producer, workers."""

    redis: Redis
    db: asyncpg.Connection
    arq: ArqRedis

    def __init__(self, env: dict[str, str], admin_url: str, owner_url: str, logs: Path) -> None:
        self.env = env
        self.admin_url = admin_url
        self.owner_url = owner_url
        self.logs = logs
        self.workers: list[WorkerProcess] = []

    async def connect(self) -> None:
        # the tests' own handles log in as Redis's admin; the workers as its worker user
        self.redis = Redis.from_url(self.admin_url)
        self.arq = await create_pool(RedisSettings.from_dsn(self.admin_url))
        self.db = await asyncpg.connect(self.owner_url)

    async def close(self) -> None:
        await self.arq.aclose()
        await self.redis.aclose()
        await self.db.close()

    async def reconnect(self) -> None:
        """New connections, after a server restarted under the old ones."""
        await self.close()
        await self.connect()

    async def start_worker(
        self, *args: str, wait: bool = True, command: Sequence[str] = WorkerProcess.COMMAND, **env: str
    ) -> WorkerProcess:
        """Start ``flowworker worker`` (or ``command``); with ``wait``, return when its heartbeat is there."""
        worker_id = env.pop('FLOWWORKER_WORKER_ID', f'test-worker-{len(self.workers) + 1}')
        log = self.logs / f'{worker_id}.log'
        worker = WorkerProcess(worker_id, {**self.env, **env}, list(args), log, command)
        self.workers.append(worker)
        if wait:
            await self.wait_for(
                lambda: self.redis.exists(f'arq:worker:{worker_id}'),
                30,
                f'heartbeat of {worker_id}',
                alive=worker,
            )
        return worker

    async def wait_for(
        self,
        condition: Callable[[], Awaitable[Any]],
        timeout: float,
        what: str,
        alive: WorkerProcess | None = None,
    ) -> Any:
        """Poll ``condition`` until it is truthy; with the ``alive`` worker, fail early if it exits,
        and with its log if the time runs out."""
        try:
            async with asyncio.timeout(timeout):
                while not (result := await condition()):
                    if alive is not None and not alive.alive():
                        pytest.fail(
                            f'worker exited ({alive.process.returncode}) before {what}:\n{alive.output()}'
                        )
                    await asyncio.sleep(0.05)
        except TimeoutError:
            if alive is None:
                raise
            pytest.fail(f'no {what} within {timeout:g} s; the worker said:\n{alive.output()}')
        return result

    async def enqueue(self, flow: str, params: dict[str, Any] | None = None, **kwargs: Any) -> str:
        job = await self.arq.enqueue_job('run_flow', flow, params or {}, _queue_name=QUEUE, **kwargs)
        assert job is not None
        return job.job_id

    async def attempts(self, job_id: str) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self.db.fetch(
            'SELECT * FROM flow_task_attempts WHERE job_id = $1 ORDER BY attempt', job_id
        )
        return rows

    async def wait_final(
        self, job_ids: list[str], timeout: float = 30, alive: WorkerProcess | None = None
    ) -> list[asyncpg.Record]:
        """Wait until every job's task record is final; the records (``alive``: as for wait_for)."""

        async def final() -> list[asyncpg.Record] | None:
            rows = await self.db.fetch(
                'SELECT * FROM flow_tasks WHERE job_id = ANY($1) AND status = ANY($2)',
                job_ids,
                FINAL_STATUSES,
            )
            return rows if len(rows) == len(job_ids) else None

        rows: list[asyncpg.Record] = await self.wait_for(
            final, timeout, f'{len(job_ids)} final task records', alive
        )
        return rows


@pytest.fixture
async def stack(redis_server: RedisServer, database: dict[str, str], tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(
        {'REDIS_URL': redis_server.worker_url}, redis_server.url, database, tmp_path
    ) as stack:
        yield stack


@contextlib.asynccontextmanager
async def open_stack(
    redis_env: dict[str, str], admin_url: str, database: dict[str, str], logs: Path
) -> AsyncIterator[Stack]:
    """A clean slate on Redis (``admin_url``) and the task records; workers reach Redis with ``redis_env``."""
    env = {
        'DATABASE_URL': database['worker'],
        **redis_env,
        'FLOWWORKER_FLOW_MODULES': 'flows_for_tests',
        'PROJECT_ROOT': str(TESTS),
        'FLOWWORKER_HEARTBEAT_INTERVAL': '1',
        'LOG_LEVEL': 'INFO',
    }
    stack = Stack(env, admin_url, database['owner'], logs)
    await stack.connect()
    await stack.redis.flushall()
    await stack.db.execute('TRUNCATE flow_task_attempts')
    try:
        yield stack
    finally:
        for worker in stack.workers:
            if worker.alive():
                worker.process.kill()
                worker.wait()
        await stack.close()


@pytest.fixture(scope='session')
def monitor(
    redis_server: RedisServer, database: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MonitorProcess]:
    """One ``flowworker monitor`` for the session, on the tests' Redis and database, with a cancel token."""
    env = {'DATABASE_URL': database['worker'], 'REDIS_URL': redis_server.monitor_url, 'MONITOR_TOKEN': TOKEN}
    with MonitorProcess(env, tmp_path_factory.mktemp('monitor')) as process:
        yield process
