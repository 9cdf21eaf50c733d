"""The operators' commands: ``flowworker status``, ``tasks``, ``cancel`` and ``purge``."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time

import pytest

from .conftest import QUEUE, Stack, flowworker
from .monitoring import known_mix


def queue_row(stdout: str, name: str) -> list[str]:
    """The fields of queue ``name``'s row in ``flowworker status`` but its oldest-ready age (seconds)."""
    [row] = [line.split() for line in stdout.splitlines() if line.startswith(f'{name} ')]
    assert re.fullmatch(r'[0-9.]+s', row[3]), row
    return row[:3] + row[4:]


async def test_status_shows_the_fleet_and_exits_0(stack: Stack) -> None:
    mix = await known_mix(stack)

    text = flowworker('status', env=stack.env)
    as_json = flowworker('status', '--json', env=stack.env)

    assert (text.returncode, text.stderr) == (0, '')
    lines = text.stdout.splitlines()
    assert lines[0].split() == [
        'WORKER',
        'HOST',
        'QUEUE',
        'STATE',
        'RUNNING',
        'COMPLETED',
        'FAILED',
        'HEARTBEAT',
    ]
    assert lines[1].split()[:7] == [
        mix.worker.worker_id,
        socket.gethostname(),
        'default',
        'running',
        '1/1',
        '3',
        '2',
    ]
    # the running job and two ready, the older due for some seconds; none deferred, one running
    assert queue_row(text.stdout, 'default') == ['default', '3', '2', '0', '1', '1']
    rates = [line.split() for line in lines if line.startswith(('1m', '5m', '15m'))]
    assert [rate[:4] for rate in rates] == [[w, '3', '2', '0'] for w in ('1m', '5m', '15m')]
    assert rates[0][4:] == ['0.05/s', '40.0%']

    assert as_json.returncode == 0
    fleet = json.loads(as_json.stdout)
    assert [w['worker_id'] for w in fleet['workers']] == [mix.worker.worker_id]
    assert [(q['name'], q['length'], q['stranded']) for q in fleet['queues']] == [('default', 3, False)]


async def test_status_exits_3_when_a_queue_has_jobs_and_no_live_worker(stack: Stack) -> None:
    await stack.start_worker()
    await stack.arq.enqueue_job('run_flow', 'demo.echo', {}, _queue_name='arq:queue:orphan')

    result = flowworker('status', env=stack.env)

    assert result.returncode == 3
    assert result.stderr == 'flowworker: queue orphan: 1 jobs and no live worker picking them\n'
    assert queue_row(result.stdout, 'orphan') == ['orphan', '1', '1', '0', '0', '0']
    assert flowworker('status', '--json', env=stack.env).returncode == 3


async def test_status_splits_a_queue_into_ready_deferred_and_running_with_the_oldest_ready_age(
    stack: Stack,
) -> None:
    worker = await stack.start_worker('--max-jobs', '1')
    running = await stack.enqueue('demo.sleep', {'seconds': 120})
    await stack.wait_for(lambda: stack.attempts(running), 30, 'the sleep job to start')
    # due 1.5 s ago (arq's score is the time a job is due), so its age is known
    await stack.enqueue('demo.echo')
    oldest = await stack.enqueue('demo.echo')
    await stack.redis.zadd(QUEUE, {oldest: int((time.time() - 1.5) * 1000)}, xx=True)
    await stack.enqueue('demo.echo', _defer_by=3600)

    [queue] = json.loads(flowworker('status', '--json', env=stack.env).stdout)['queues']

    # in progress: the rest (exact, from arq's in-progress keys; `running` is the heartbeats' lagging count)
    assert (queue['length'], queue['ready'], queue['deferred']) == (4, 2, 1)
    assert 1.5 <= queue['oldest_ready_age'] < 30
    assert worker.alive()


async def test_status_of_a_draining_fleet_is_stranded_too(stack: Stack) -> None:
    worker = await stack.start_worker()
    worker.signal(signal.SIGUSR1)

    async def draining() -> bool:
        beat = await stack.redis.get(f'arq:worker:{worker.worker_id}')
        return beat is not None and json.loads(beat)['state'] == 'draining'

    await stack.wait_for(draining, 10, 'the worker to report draining')
    assert flowworker('status', env=stack.env).returncode == 0  # nothing is waiting
    await stack.enqueue('demo.echo')
    result = flowworker('status', env=stack.env)
    assert result.returncode == 3
    assert queue_row(result.stdout, 'default') == ['default', '1', '1', '0', '0', '0', 'of', '1']


def test_status_without_redis_is_one_line_and_exit_1() -> None:
    env = {'DATABASE_URL': 'postgresql://u:hunter2@127.0.0.1:1/d', 'REDIS_URL': 'redis://127.0.0.1:1/0'}
    result = flowworker('status', env=env, inherit=False)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith('flowworker: error: cannot reach Redis: ConnectionError:')
    assert 'hunter2' not in line


async def test_tasks_finds_stuck_ones(stack: Stack) -> None:
    mix = await known_mix(stack)
    await stack.db.execute(
        "UPDATE flow_task_attempts SET started_at = now() - interval '11 minutes' WHERE job_id = $1",
        mix.running,
    )

    stuck = flowworker('tasks', '--status', 'running', '--older-than', '10m', '--json', env=stack.env)
    assert stuck.returncode == 0, stuck.stderr
    [task] = json.loads(stuck.stdout)
    assert (task['job_id'], task['flow'], task['status'], task['worker_id']) == (
        mix.running,
        'demo.sleep',
        'running',
        mix.worker.worker_id,
    )
    assert task['runtime'] >= 600

    table = flowworker('tasks', '--status', 'running', '--older-than', '10m', env=stack.env)
    assert table.stdout.splitlines()[0].split()[:4] == ['JOB', 'ID', 'FLOW', 'STATUS']
    assert table.stdout.splitlines()[1].split()[:4] == [mix.running, 'demo.sleep', 'running', '1']
    assert flowworker('tasks', '--older-than', '1h', env=stack.env).stdout == 'no tasks\n'

    failed = flowworker('tasks', '--flow', 'demo.fail', '--limit', '1', '--json', env=stack.env)
    assert [t['job_id'] for t in json.loads(failed.stdout)] in ([mix.failed[0]], [mix.failed[1]])


async def test_cancel_a_queued_then_a_running_job(stack: Stack) -> None:
    mix = await known_mix(stack)
    queued = mix.queued[0]

    # the worker's one slot is busy: nobody takes the queued job yet
    waiting = flowworker('cancel', queued, '--wait', '1', env=stack.env)
    assert waiting.returncode == 1
    assert f'job {queued}: cancel requested; no worker has acted on it within 1s' in waiting.stderr

    running = flowworker('cancel', mix.running, env=stack.env)
    assert (running.returncode, running.stdout) == (0, f'job {mix.running} cancelled\n'), running.stderr

    # the slot is free: the worker takes the queued job, finds it aborted, and records that too
    tasks = {task['job_id']: task for task in await stack.wait_final([mix.running, queued, mix.queued[1]])}
    assert (tasks[mix.running]['status'], tasks[mix.running]['error']) == ('cancelled', 'aborted')
    assert (tasks[queued]['status'], tasks[queued]['flow'], tasks[queued]['error']) == (
        'cancelled',
        'demo.echo',
        'aborted',
    )
    assert tasks[mix.queued[1]]['status'] == 'succeeded'

    finished = flowworker('cancel', mix.succeeded[0], env=stack.env)
    assert (finished.returncode, finished.stderr) == (1, f'job {mix.succeeded[0]} has already finished\n')
    unknown = flowworker('cancel', 'no-such-job', env=stack.env)
    assert (unknown.returncode, unknown.stderr) == (1, 'job no-such-job is not queued or running\n')


def purge(stack: Stack, *args: str, answer: str | None = None) -> subprocess.CompletedProcess[str]:
    return flowworker('purge', '--queue', 'default', *args, env=stack.env, stdin=answer)


async def test_purge_removes_queued_jobs_and_leaves_running_ones(stack: Stack) -> None:
    worker = await stack.start_worker('--max-jobs', '1')
    running = await stack.enqueue('demo.sleep', {'seconds': 120})
    await stack.wait_for(lambda: stack.attempts(running), 30, 'the sleep job to start')
    queued = [await stack.enqueue('demo.echo') for _ in range(4)]
    deferred = await stack.enqueue('demo.echo', _defer_by=3600)

    refused = purge(stack, answer='n\n')
    assert refused.returncode == 1
    assert refused.stderr == (
        'Remove the jobs of arq:queue:default that are not running (6 in the queue)? [y/N] '
        'not confirmed; nothing removed\n'
    )
    assert await stack.redis.zcard(QUEUE) == 6

    confirmed = purge(stack, answer='y\n')
    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmed.stdout == 'removed 5 jobs from arq:queue:default (1 running jobs left alone)\n'
    assert await stack.redis.zrange(QUEUE, 0, -1) == [running.encode()]
    for job_id in [*queued, deferred]:
        assert not await stack.redis.exists(f'arq:job:{job_id}')

    # the running job goes on: still in its queue, its key there, its record running
    assert await stack.redis.exists(f'arq:job:{running}')
    assert [attempt['status'] for attempt in await stack.attempts(running)] == ['running']
    assert await stack.attempts(queued[0]) == []
    assert worker.alive()

    again = purge(stack, '--yes')
    assert (again.returncode, again.stdout) == (
        0,
        'removed 0 jobs from arq:queue:default (1 running jobs left alone)\n',
    )
    empty = flowworker('purge', '--queue', 'empty', env=stack.env, stdin='')
    assert (empty.returncode, empty.stdout) == (0, 'arq:queue:empty is empty; nothing to remove\n')


# (arguments, the one line expected on stderr)
BAD = [
    (['tasks', '--status', 'stuck'], "argument --status: invalid choice: 'stuck'"),
    (['tasks', '--older-than', '10x'], "argument --older-than: '10x' is not a duration"),
    (['tasks', '--limit', '0'], "argument --limit: '0' is not a whole number of at least 1"),
    (['cancel', 'job', '--wait', '-1'], "argument --wait: '-1' is not a number of seconds (0 or more)"),
    (['cancel'], 'the following arguments are required: JOB_ID'),
    (['purge'], 'the following arguments are required: --queue'),
    (['purge', '--queue', 'no spaces', '--yes'], 'flowworker: error: --queue: String should match pattern'),
    (['status', '--env-file', '/nonexistent/.env'], '--env-file /nonexistent/.env: no such file'),
]


@pytest.mark.parametrize(('args', 'message'), BAD, ids=[' '.join(args) for args, _ in BAD])
def test_bad_options_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    env = {'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/d', 'REDIS_URL': 'redis://127.0.0.1:1/0'}
    result = flowworker(*args, env=env, inherit=False)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert message in line
