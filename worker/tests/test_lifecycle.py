"""A worker process from start to stop: heartbeat, drain on SIGTERM, quiet on SIGUSR1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from datetime import datetime

from .conftest import QUEUE, Stack
from .servers import WorkerProcess


async def heartbeat(stack: Stack, worker_id: str) -> dict[str, object] | None:
    value = await stack.redis.get(f'arq:worker:{worker_id}')
    return None if value is None else dict(json.loads(value))


async def test_the_heartbeat_key_says_who_is_alive_and_vanishes_on_exit(stack: Stack) -> None:
    worker = await stack.start_worker('--max-jobs', '7', '--queue-name', 'default')
    job_id = await stack.enqueue('demo.echo')
    await stack.wait_final([job_id])

    async def counted() -> dict[str, object] | None:
        beat = await heartbeat(stack, worker.worker_id)
        return (
            beat
            if beat and beat['jobs'] == {'running': 0, 'completed': 1, 'failed': 0, 'retried': 0}
            else None
        )

    beat = await stack.wait_for(counted, 10, 'the heartbeat to count the job')
    assert beat['worker_id'] == 'test-worker-1'
    assert beat['host'] == socket.gethostname()
    assert beat['pid'] == worker.pid
    assert beat['queue'] == 'default'
    assert beat['max_jobs'] == 7
    assert beat['state'] == 'running'
    assert beat['database'] == 'ok'
    assert datetime.fromisoformat(str(beat['started_at'])) <= datetime.fromisoformat(str(beat['beat_at']))
    # three heartbeat intervals (1 s in the tests)
    assert 0 < await stack.redis.ttl('arq:worker:test-worker-1') <= 3
    assert await stack.redis.keys('arq:worker:*') == [b'arq:worker:test-worker-1']

    assert worker.stop() == 0
    assert await stack.redis.keys('arq:worker:*') == []


async def running_sleep(stack: Stack, seconds: float, *worker_args: str) -> tuple[WorkerProcess, str]:
    """A worker and the id of a demo.sleep job it has started."""
    worker = await stack.start_worker(*worker_args)
    job_id = await stack.enqueue('demo.sleep', {'seconds': seconds})
    await stack.wait_for(lambda: stack.attempts(job_id), 10, 'the job to start')
    return worker, job_id


async def redis_calls(stack: Stack, *commands: str) -> int:
    stats = await stack.redis.info('commandstats')
    return sum(int(stats.get(f'cmdstat_{command}', {}).get('calls', 0)) for command in commands)


async def test_a_worker_with_a_running_job_and_free_slots_does_not_spin_on_the_queue(stack: Stack) -> None:
    worker, job_id = await running_sleep(stack, 3)
    before = await redis_calls(stack, 'zrange', 'zrangebyscore')

    await asyncio.sleep(1.5)

    # its own job stays in the queue, due, while it runs: the worker must not poll it in a loop
    # (about two reads per wake-up, and the safety-net wake-up comes once a second)
    assert await redis_calls(stack, 'zrange', 'zrangebyscore') - before <= 12
    [task] = await stack.wait_final([job_id])
    assert task['status'] == 'succeeded'
    assert worker.stop() == 0


async def test_a_deferred_job_starts_when_it_is_due_while_another_runs(stack: Stack) -> None:
    worker, running = await running_sleep(stack, 3)
    deferred = await stack.enqueue('demo.echo', _defer_by=0.5)

    [task] = await stack.wait_final([deferred], timeout=10)

    assert task['worker_id'] == worker.worker_id
    assert (task['started_at'] - task['enqueued_at']).total_seconds() >= 0.4
    [first] = await stack.wait_final([running])
    assert first['status'] == 'succeeded'
    assert task['finished_at'] < first['finished_at']


async def test_sigterm_lets_a_running_job_finish_then_exits_0(stack: Stack) -> None:
    worker, job_id = await running_sleep(stack, 1.5, '--drain-timeout', '30')

    worker.signal(signal.SIGTERM)

    assert worker.wait(30) == 0
    [task] = await stack.wait_final([job_id])
    assert task['status'] == 'succeeded'
    assert 'SIGTERM: draining for up to 30s' in worker.output()
    assert await stack.redis.exists('arq:worker:test-worker-1') == 0


async def test_a_job_that_outlasts_the_drain_is_requeued_and_runs_again(stack: Stack) -> None:
    worker, job_id = await running_sleep(stack, 3, '--drain-timeout', '0.5')

    worker.signal(signal.SIGTERM)

    assert worker.wait(30) == 0
    [first] = await stack.attempts(job_id)
    assert (first['status'], first['error']) == ('interrupted', 'the worker stopped; the job is queued again')
    assert await stack.redis.zcard(QUEUE) == 1

    await stack.start_worker()
    await stack.wait_final([job_id])
    assert [a['status'] for a in await stack.attempts(job_id)] == ['interrupted', 'succeeded']


async def test_sigusr1_stops_picking_jobs_but_keeps_the_process(stack: Stack) -> None:
    worker, running = await running_sleep(stack, 1)

    worker.signal(signal.SIGUSR1)

    async def draining() -> bool:
        beat = await heartbeat(stack, worker.worker_id)
        return beat is not None and beat['state'] == 'draining'

    await stack.wait_for(draining, 10, 'the heartbeat to say draining', alive=worker)
    queued = await stack.enqueue('demo.echo')
    # the running job still finishes; the one queued after the signal waits for another worker
    await stack.wait_final([running])
    assert worker.alive()
    assert await stack.redis.zscore(QUEUE, queued) is not None
    assert await stack.attempts(queued) == []

    other = await stack.start_worker()
    [task] = await stack.wait_final([queued])
    assert task['worker_id'] == other.worker_id
    assert worker.stop() == 0


async def test_a_killed_workers_job_is_marked_lost_and_runs_again(stack: Stack) -> None:
    worker, job_id = await running_sleep(stack, 1)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()

    # the same worker id coming back (a systemd instance restarting) settles its old attempt
    await stack.start_worker(FLOWWORKER_WORKER_ID=worker.worker_id)
    [attempt] = await stack.wait_for(
        lambda: stack.db.fetch("SELECT * FROM flow_task_attempts WHERE status = 'lost'"),
        10,
        'the attempt marked lost',
    )
    assert attempt['job_id'] == job_id
    assert attempt['worker_id'] == worker.worker_id
    assert 'killed or crashed' in attempt['error']
    # at once, not when arq's in-progress key expires (an hour and more with the default timeout)
    await stack.wait_final([job_id], timeout=20)
    assert [a['status'] for a in await stack.attempts(job_id)] == ['lost', 'succeeded']


async def test_a_dead_workers_job_is_released_by_a_living_one_once_its_heartbeat_expires(
    stack: Stack,
) -> None:
    workers = {w.worker_id: w for w in [await stack.start_worker(), await stack.start_worker()]}
    job_id = await stack.enqueue('demo.sleep', {'seconds': 30})
    [first] = await stack.wait_for(lambda: stack.attempts(job_id), 10, 'the job to start')
    killed = workers.pop(first['worker_id'])
    [survivor] = workers.values()
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()

    # nobody starts again: the survivor's sweeps (every 3 intervals of 1 s) find the heartbeat
    # expired twice in a row and release the job, long before arq's in-progress key would expire
    await stack.wait_final([job_id], timeout=60)
    attempts = await stack.attempts(job_id)
    assert [(a['status'], a['worker_id']) for a in attempts] == [
        ('lost', killed.worker_id),
        ('succeeded', survivor.worker_id),
    ]


async def test_the_guides_start_command_runs_from_a_checkout(stack: Stack) -> None:
    # `cd worker && python scripts/start_worker.py --max-jobs 5 --log-level DEBUG`, as the guide says
    worker = await stack.start_worker(
        '--max-jobs', '5', '--log-level', 'DEBUG', command=[sys.executable, 'scripts/start_worker.py']
    )
    beat = await heartbeat(stack, worker.worker_id)
    assert beat is not None
    assert beat['max_jobs'] == 5
    assert worker.stop() == 0
    assert 'DEBUG   flowworker.heartbeat: heartbeat arq:worker:' in worker.output()


async def test_json_logs_are_one_object_per_line(stack: Stack) -> None:
    worker = await stack.start_worker(LOG_FORMAT='json')
    await stack.wait_final([await stack.enqueue('demo.fail')])
    assert worker.stop() == 0

    lines = [json.loads(line) for line in worker.output().splitlines()]
    failed = next(line for line in lines if line['message'] == 'task failed')
    assert failed['level'] == 'WARNING'
    assert failed['flow'] == 'demo.fail'
    assert failed['error'] == 'DemoFailure: demo.fail always fails'
    assert 'DemoFailure' in failed['exception']
    assert {line['message'] for line in lines} >= {'task started', 'worker test-worker-1 stopped'}


async def test_a_worker_that_may_not_run_config_finds_the_keyspace_events_by_a_probe(stack: Stack) -> None:
    worker = await stack.start_worker()
    await stack.wait_final([await stack.enqueue('demo.echo')])
    assert worker.stop() == 0
    assert 'wakeup=events' in worker.output()
    assert await stack.redis.keys('flowworker:wakeup-probe:*') == []


async def test_a_stop_while_the_worker_starts_is_not_lost(stack: Stack) -> None:
    """Without keyspace events the wake-up's probe waits its whole second after the first
    heartbeat, before arq's loop runs: a SIGTERM in that second still stops the worker."""
    await stack.redis.config_set('notify-keyspace-events', '')
    try:
        worker = await stack.start_worker()
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0, worker.output()
    finally:
        await stack.redis.config_set('notify-keyspace-events', 'Kz')


async def test_without_keyspace_events_the_worker_polls(stack: Stack) -> None:
    await stack.redis.config_set('notify-keyspace-events', '')
    try:
        worker = await stack.start_worker()
        await stack.wait_final([await stack.enqueue('demo.echo')])
    finally:
        await stack.redis.config_set('notify-keyspace-events', 'Kz')
    assert worker.stop() == 0
    assert 'no keyspace event for a sorted set within 1s: polling the queue' in worker.output()
    assert 'wakeup=polling' in worker.output()
    assert await stack.redis.keys('flowworker:wakeup-probe:*') == []
