"""Task records you can trust: a job that ended is never recorded lost, and old records can be pruned."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from arq.constants import result_key_prefix

from flowworker.store import SPILLED_KEY, spill_key

from .conftest import Stack, flowworker
from .servers import PostgresServer, WorkerProcess


@asynccontextmanager
async def records_held(stack: Stack) -> AsyncIterator[None]:
    """PostgreSQL takes no record while inside: the table is locked against writes (reads go on)."""
    conn = await asyncpg.connect(stack.owner_url)
    try:
        async with conn.transaction():
            await conn.execute('LOCK TABLE flow_task_attempts IN SHARE MODE')
            yield
    finally:
        await conn.close()


async def is_draining(stack: Stack, worker_id: str) -> bool:
    beat = await stack.redis.get(f'arq:worker:{worker_id}')
    return beat is not None and json.loads(beat)['state'] == 'draining'


async def end_its_connections(superuser_url: str, worker: WorkerProcess) -> None:
    """End the PostgreSQL sessions of the killed ``worker``: a statement it sent just before it
    died, waiting for a lock, would otherwise run once the lock goes (the server does not check
    whether the client still listens)."""
    conn = await asyncpg.connect(superuser_url)
    try:
        name = f'flowworker worker {worker.worker_id}'
        query = 'SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1'
        while await conn.fetchval(query, name):
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def killed_after_its_result(
    stack: Stack, superuser_url: str, worker: WorkerProcess, tmp_path: Path, **params: str
) -> str:
    """Run a job on ``worker`` and SIGKILL it once arq has stored the job's result and before its
    final record is written (held by a lock, not by luck); the job's id."""
    release = tmp_path / 'release'
    job_id = await stack.enqueue('test.hold', {'path': str(release), **params})
    await stack.wait_for(
        lambda: stack.db.fetchval(
            "SELECT status = 'running' FROM flow_task_attempts WHERE job_id = $1", job_id
        ),
        10,
        'the running record',
    )
    async with records_held(stack):
        release.touch()
        await stack.wait_for(lambda: stack.redis.exists(result_key_prefix + job_id), 10, "arq's result")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        await end_its_connections(superuser_url, worker)
    assert [a['status'] for a in await stack.attempts(job_id)] == ['running']
    return job_id


async def assert_settled_from_the_result(
    stack: Stack, job_id: str, worker_id: str, release: Path, status: str = 'succeeded'
) -> None:
    [attempt] = await stack.wait_final([job_id], timeout=30)
    assert (attempt['status'], attempt['attempt'], attempt['worker_id']) == (status, 1, worker_id)
    if status == 'succeeded':
        assert (attempt['result'], attempt['error']) == ('{"runs": 1}', None)
    else:
        assert (attempt['result'], attempt['error']) == (None, 'ValueError: no luck')
    assert attempt['finished_at'] >= attempt['started_at']
    assert len(await stack.attempts(job_id)) == 1
    await asyncio.sleep(1)  # a second run, if anything released the job, would have started by now
    assert Path(str(release) + '.runs').read_text() == 'run\n'
    assert len(await stack.attempts(job_id)) == 1


@pytest.mark.parametrize(('params', 'status'), [({}, 'succeeded'), ({'fail': 'no luck'}, 'failed')])
async def test_a_job_killed_after_its_result_is_recorded_as_it_ended_on_restart(
    stack: Stack, postgres_server: PostgresServer, tmp_path: Path, params: dict[str, str], status: str
) -> None:
    worker = await stack.start_worker()
    job_id = await killed_after_its_result(stack, postgres_server.dsn(), worker, tmp_path, **params)

    # the same worker id coming back (a systemd instance restarting) settles its old attempt
    again = await stack.start_worker(FLOWWORKER_WORKER_ID=worker.worker_id)
    await assert_settled_from_the_result(stack, job_id, worker.worker_id, tmp_path / 'release', status)
    assert 'recorded 1 task attempts from their results in Redis' in again.output()
    assert 'lost' not in again.output()


async def test_a_job_killed_after_its_result_is_recorded_succeeded_by_the_sweep(
    stack: Stack, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    workers = [await stack.start_worker(), await stack.start_worker()]
    doomed, survivor = workers
    # the survivor is quiet: the job goes to the one that will be killed
    survivor.signal(signal.SIGUSR1)
    await stack.wait_for(lambda: is_draining(stack, survivor.worker_id), 10, 'the quiet heartbeat')
    job_id = await killed_after_its_result(stack, postgres_server.dsn(), doomed, tmp_path)

    # nobody restarts: the survivor's sweep finds the heartbeat gone twice in a row
    await assert_settled_from_the_result(stack, job_id, doomed.worker_id, tmp_path / 'release')
    assert 'recorded 1 task attempts from their results in Redis' in survivor.output()


# (job, attempt, status, finished days ago; None: still running): what a prune at 30 days meets
RECORDS = [
    ('old-succeeded', 1, 'succeeded', 40),
    ('old-failed', 1, 'lost', 41),
    ('old-failed', 2, 'failed', 40),
    ('old-cancelled', 1, 'cancelled', 35),
    ('new-succeeded', 1, 'succeeded', 1),
    ('old-retrying', 1, 'retrying', 40),
    ('old-lost', 1, 'lost', 40),
    ('old-running', 1, 'running', None),
    ('rerun', 1, 'failed', 40),
    ('rerun', 2, 'running', None),
]
PRUNED = {'old-succeeded', 'old-failed', 'old-cancelled'}


async def insert_records(stack: Stack) -> None:
    await stack.db.executemany(
        'INSERT INTO flow_task_attempts (job_id, attempt, flow, queue, status, worker_id, started_at, '
        "finished_at) VALUES ($1, $2, 'demo.echo', 'default', $3, 'w', now() - make_interval(days => $4), "
        'now() - make_interval(days => $5))',
        [(job, n, status, 50 if days is None else days, days) for job, n, status, days in RECORDS],
    )


async def remaining(stack: Stack) -> set[str]:
    return {row['job_id'] for row in await stack.db.fetch('SELECT job_id FROM flow_task_attempts')}


async def test_prune_removes_final_jobs_older_than_the_age_in_batches(stack: Stack) -> None:
    await insert_records(stack)
    owner = {'DATABASE_URL': stack.owner_url}

    dry = flowworker('db', 'prune', '--older-than', '30d', '--dry-run', env=owner)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith('would prune 3 jobs (4 attempts) finished before ')
    assert dry.stdout.rstrip().endswith(': succeeded 1, failed 1, cancelled 1')
    assert await remaining(stack) == {job for job, *_ in RECORDS}

    pruned = flowworker('db', 'prune', '--older-than', '30d', '--batch', '2', env=owner)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith('pruned 3 jobs (4 attempts) finished before ')
    assert ' in 2 batches: succeeded 1, failed 1, cancelled 1' in pruned.stdout
    assert await remaining(stack) == {job for job, *_ in RECORDS} - PRUNED
    assert len(await stack.attempts('rerun')) == 2

    again = flowworker('db', 'prune', '--older-than', '30d', env=owner)
    assert again.stdout.startswith('pruned 0 jobs (0 attempts)')


async def test_the_worker_role_cannot_prune(stack: Stack) -> None:
    await insert_records(stack)

    denied = flowworker('db', 'prune', '--older-than', '30d', env={'DATABASE_URL': stack.env['DATABASE_URL']})

    assert denied.returncode == 2
    assert 'may not delete task records: run `flowworker db prune` as the schema owner' in denied.stderr
    assert await remaining(stack) == {job for job, *_ in RECORDS}


@pytest.mark.parametrize(
    ('args', 'message'),
    [
        (['--older-than', 'a month'], "argument --older-than: 'a month' is not a duration"),
        (['--older-than', '0d'], "argument --older-than: '0d' must be more than 0"),
        (
            ['--older-than', '30d', '--batch', '0'],
            "argument --batch: '0' is not a whole number of at least 1",
        ),
        ([], 'the following arguments are required: --older-than'),
    ],
)
async def test_prune_refuses_bad_options(stack: Stack, args: list[str], message: str) -> None:
    refused = flowworker('db', 'prune', *args, env={'DATABASE_URL': stack.owner_url})
    assert (refused.returncode, refused.stdout) == (2, '')
    assert message in refused.stderr


async def test_records_postgresql_did_not_take_before_shutdown_wait_in_redis_for_the_next_worker(
    stack: Stack, postgres_server: PostgresServer
) -> None:
    worker = await stack.start_worker()
    postgres_server.stop()
    try:
        job_id = await stack.enqueue('demo.echo', {'n': 7})
        await stack.wait_for(lambda: stack.redis.exists(result_key_prefix + job_id), 20, "arq's result")
        assert worker.stop() == 0  # the records cannot be written within the 5 s it waits for them
        assert 'handed 1 task records to Redis (flowworker:records:' in worker.output()
        assert await stack.redis.exists(spill_key(worker.worker_id), SPILLED_KEY) == 2
    finally:
        postgres_server.start()
    await stack.reconnect()

    # any worker starting (here another id) writes what a worker that is gone left in Redis
    other = await stack.start_worker()
    [attempt] = await stack.wait_final([job_id])
    assert (attempt['status'], attempt['worker_id']) == ('succeeded', worker.worker_id)
    assert attempt['result'] == '{"n": 7}'
    assert 'wrote 1 task records that workers handed to Redis at shutdown' in other.output()
    assert not await stack.redis.exists(spill_key(worker.worker_id), SPILLED_KEY)


async def test_a_result_jsonb_cannot_hold_is_recorded_as_text_and_the_records_go_on(stack: Stack) -> None:
    await stack.start_worker()
    odd = await stack.enqueue('demo.echo', {'ratio': float('nan'), 'name': 'a\x00b'})
    plain = await stack.enqueue('demo.echo', {'n': 1})
    records = {task['job_id']: task for task in await stack.wait_final([odd, plain])}
    assert records[odd]['status'] == 'succeeded'
    assert records[odd]['result'] == "\"{'ratio': nan, 'name': 'a\\\\x00b'}\""
    assert records[plain]['result'] == '{"n": 1}'
