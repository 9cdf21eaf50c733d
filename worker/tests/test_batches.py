"""Jobs claimed and finished several at a time (``batches.py``): each still ends exactly once,
readable by arq, through aborts, a result Redis refuses, a drain and a kill in mid-batch."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from pathlib import Path

import pytest
from arq.constants import in_progress_key_prefix, result_key_prefix
from arq.jobs import Job, JobStatus
from redis.asyncio import Redis

from flowworker.batches import Ending, Finisher
from flowworker.infrastructure import count_redis_reconnects

from .conftest import QUEUE, Stack


def job(stack: Stack, job_id: str) -> Job:
    return Job(job_id, stack.arq, _queue_name=QUEUE)


async def succeeded(stack: Stack) -> int:
    count: int = await stack.db.fetchval("SELECT count(*) FROM flow_task_attempts WHERE status = 'succeeded'")
    return count


async def assert_each_succeeded_once(stack: Stack, job_ids: list[str]) -> None:
    """Every job has arq's result and exactly one succeeded attempt, and nothing of it is left queued."""
    rows = await stack.db.fetch(
        "SELECT job_id, count(*) FILTER (WHERE status = 'succeeded') AS ok FROM flow_task_attempts "
        'WHERE job_id = ANY($1) GROUP BY job_id',
        job_ids,
    )
    assert {row['job_id']: row['ok'] for row in rows} == dict.fromkeys(job_ids, 1)
    assert await stack.redis.exists(*(result_key_prefix + j for j in job_ids)) == len(job_ids)
    assert await stack.redis.exists(*(in_progress_key_prefix + j for j in job_ids)) == 0
    assert await stack.redis.zcard(QUEUE) == 0


async def test_a_batch_with_aborted_jobs_ends_each_job_once(stack: Stack, tmp_path: Path) -> None:
    release = tmp_path / 'release'
    held = [await stack.enqueue('test.hold', {'path': str(release)}) for _ in range(4)]
    early = await stack.enqueue('demo.echo')
    # asked before any worker runs: the claim that takes it with the others takes the request too
    early_abort = asyncio.create_task(job(stack, early).abort(timeout=20, poll_delay=0.05))
    await stack.wait_for(lambda: stack.redis.zscore('arq:abort', early), 5, 'the abort request')
    await stack.start_worker('--max-jobs', '10')
    await stack.wait_for(
        lambda: stack.db.fetchval("SELECT count(*) = 4 FROM flow_task_attempts WHERE status = 'running'"),
        10,
        'the held jobs to run',
    )
    assert await early_abort is True
    # one of the running batch is aborted; the others end together once released
    assert await job(stack, held[0]).abort(timeout=10, poll_delay=0.05) is True
    release.touch()

    tasks = {t['job_id']: t for t in await stack.wait_final([early, *held])}
    assert {j: t['status'] for j, t in tasks.items()} == {
        early: 'cancelled',
        held[0]: 'cancelled',
        **dict.fromkeys(held[1:], 'succeeded'),
    }
    for job_id in (early, held[0]):
        with pytest.raises(asyncio.CancelledError):
            await job(stack, job_id).result(timeout=1)
    for job_id in held[1:]:
        assert await job(stack, job_id).result(timeout=1) == {'runs': 4}  # the four share one file
    for job_id in (early, *held):
        assert await job(stack, job_id).status() == JobStatus.complete
        assert len(await stack.attempts(job_id)) == 1
    assert await stack.redis.zcard(QUEUE) == 0
    assert await stack.redis.zcard('arq:abort') == 0


async def test_results_redis_refuses_are_written_once_it_takes_them(stack: Stack, tmp_path: Path) -> None:
    worker = await stack.start_worker('--max-jobs', '10')
    release = tmp_path / 'release'
    job_ids = [await stack.enqueue('test.hold', {'path': str(release)}) for _ in range(3)]
    await stack.wait_for(
        lambda: stack.db.fetchval("SELECT count(*) = 3 FROM flow_task_attempts WHERE status = 'running'"),
        10,
        'the jobs to run',
    )
    # Redis out of memory (noeviction): it refuses every write that would grow it, the results too
    await stack.redis.config_set('maxmemory', '1')
    try:
        release.touch()
        await stack.wait_for(
            lambda: stack.db.fetchval(
                "SELECT count(*) = 3 FROM flow_task_attempts WHERE status = 'succeeded'"
            ),
            10,
            'the jobs to end',
        )
        await asyncio.sleep(1)  # at least one more try of the write
        assert await stack.redis.exists(*(result_key_prefix + j for j in job_ids)) == 0
        # still claimed and queued, so no other worker runs them again meanwhile
        assert await stack.redis.exists(*(in_progress_key_prefix + j for j in job_ids)) == 3
        assert worker.alive()
    finally:
        await stack.redis.config_set('maxmemory', '0')

    for job_id in job_ids:
        assert await job(stack, job_id).result(timeout=15, poll_delay=0.05) == {'runs': 3}
    await assert_each_succeeded_once(stack, job_ids)
    assert await job(stack, job_ids[0]).status() == JobStatus.complete
    assert (tmp_path / 'release.runs').read_text() == 'run\n' * 3
    assert 'OOM command not allowed' in worker.output()
    assert worker.stop() == 0


async def test_a_write_in_flight_outlives_a_garbage_collection(stack: Stack) -> None:
    # The finisher's task, awaiting Redis's reply, is reachable only through its connection (the
    # worker's pool holds its connections in use weakly, see count_redis_reconnects): a collection
    # destroyed it mid-write, the job's end lost and the worker failing, unless the finisher holds it.
    job_id = await stack.enqueue('demo.echo')
    await stack.redis.set(in_progress_key_prefix + job_id, b'1')
    redis = Redis.from_url(stack.admin_url)
    await count_redis_reconnects(redis, lambda: None)
    finisher = Finisher(redis, QUEUE)
    await stack.redis.client_pause(500, all=False)  # the reply comes in 0.5 s
    finishing = asyncio.create_task(finisher.finish(Ending(job_id, True, b'result', 0, None)))
    await asyncio.sleep(0.1)
    gc.collect()
    await asyncio.wait_for(finishing, 5)
    await redis.aclose()
    assert await stack.redis.get(result_key_prefix + job_id) == b'result'
    assert await stack.redis.exists(in_progress_key_prefix + job_id) == 0
    assert await stack.redis.zcard(QUEUE) == 0


JOBS = 60


async def test_sigterm_in_mid_batch_finishes_what_was_claimed_and_leaves_the_rest(stack: Stack) -> None:
    worker = await stack.start_worker('--max-jobs', '10', '--drain-timeout', '30')
    job_ids = [await stack.enqueue('demo.sleep', {'seconds': 0.2}) for _ in range(JOBS)]
    await stack.wait_for(lambda: succeeded(stack), 20, 'the first batch to end', alive=worker)

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    # what it claimed it finished; the rest it did not touch: queued, no attempt, no in-progress key
    attempts = await stack.db.fetch('SELECT job_id, status FROM flow_task_attempts')
    assert {a['status'] for a in attempts} == {'succeeded'}
    done = {a['job_id'] for a in attempts}
    left = [j for j in job_ids if j not in done]
    assert left, 'the worker ran the whole queue before the signal'
    assert await stack.redis.zcard(QUEUE) == len(left)
    assert await stack.redis.exists(*(in_progress_key_prefix + j for j in job_ids)) == 0

    await stack.start_worker('--max-jobs', '10')
    await stack.wait_final(job_ids, timeout=30)
    await assert_each_succeeded_once(stack, job_ids)


async def test_sigkill_in_mid_batch_runs_every_job_to_the_end_once(stack: Stack) -> None:
    worker = await stack.start_worker('--max-jobs', '10', '--job-timeout', '2')
    job_ids = [await stack.enqueue('demo.sleep', {'seconds': 0.3}) for _ in range(40)]
    await stack.wait_for(lambda: succeeded(stack), 20, 'the first batch to end', alive=worker)

    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()

    # the same id restarting marks what was running lost and releases it; a job claimed too
    # shortly before the kill to have a record waits for its in-progress key (17 s here)
    await stack.start_worker('--max-jobs', '10', '--job-timeout', '2', FLOWWORKER_WORKER_ID=worker.worker_id)
    await stack.wait_final(job_ids, timeout=45)
    await assert_each_succeeded_once(stack, job_ids)
    statuses = await stack.db.fetch('SELECT DISTINCT status FROM flow_task_attempts')
    assert {s['status'] for s in statuses} <= {'succeeded', 'lost'}
