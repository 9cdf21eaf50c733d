"""Redis or PostgreSQL going away under a busy worker: the process stays, no job is lost or doubled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .conftest import Stack
from .servers import PostgresServer, RedisServer

JOBS = 40


async def survive_outage(stack: Stack, stop: Callable[[], None], start: Callable[[], None]) -> str:
    """Run JOBS short jobs through a restart of a server; check every one ends once; the worker's log."""
    worker = await stack.start_worker('--max-jobs', '4')
    job_ids = [await stack.enqueue('demo.sleep', {'seconds': 0.1}) for _ in range(JOBS)]
    await stack.wait_for(
        lambda: stack.db.fetchval("SELECT count(*) FROM flow_task_attempts WHERE status = 'succeeded'"),
        30,
        'the first jobs to finish',
    )

    stop()
    await asyncio.sleep(3)  # the outage itself: nothing to wait for but time
    assert worker.alive()
    start()
    await stack.reconnect()

    tasks = await stack.wait_final(job_ids, timeout=90, alive=worker)
    assert sorted(t['job_id'] for t in tasks) == sorted(job_ids)
    assert {t['status'] for t in tasks} == {'succeeded'}
    # no attempt left running, none run twice to success
    assert await stack.db.fetchval("SELECT count(*) FROM flow_task_attempts WHERE status = 'running'") == 0
    assert (
        await stack.db.fetchval("SELECT count(*) FROM flow_task_attempts WHERE status = 'succeeded'") == JOBS
    )
    assert worker.alive()
    assert worker.stop() == 0
    return worker.output()


async def test_a_redis_restart_loses_no_job(stack: Stack, redis_server: RedisServer) -> None:
    log = await survive_outage(stack, redis_server.stop, redis_server.start)
    assert 'Redis is unreachable, retrying in' in log
    assert 'Redis is reachable again' in log


async def test_a_postgresql_restart_loses_no_record(stack: Stack, postgres_server: PostgresServer) -> None:
    log = await survive_outage(stack, postgres_server.stop, postgres_server.start)
    assert 'cannot write' in log
    assert 'PostgreSQL is reachable again; task records are being written' in log
