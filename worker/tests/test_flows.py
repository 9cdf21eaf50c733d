"""What happens to a job, by how its flow ends: results in arq, records in PostgreSQL."""

from __future__ import annotations

import json

import pytest
from arq.connections import RedisSettings, create_pool
from arq.jobs import Job

from flowworker.runner import FlowFailed

from .conftest import QUEUE, Stack, flowworker


async def result_of(stack: Stack, job_id: str) -> object:
    return await Job(job_id, stack.arq, _queue_name=QUEUE).result(timeout=30, poll_delay=0.05)


async def test_success_is_recorded_with_the_result(stack: Stack) -> None:
    await stack.start_worker()
    job_id = await stack.enqueue('demo.echo', {'greeting': 'hello'})

    assert await result_of(stack, job_id) == {'greeting': 'hello'}
    [task] = await stack.wait_final([job_id])
    assert task['status'] == 'succeeded'
    assert task['flow'] == 'demo.echo'
    assert task['queue'] == 'default'
    assert task['worker_id'] == 'test-worker-1'
    assert task['attempt'] == 1
    assert json.loads(task['result']) == {'greeting': 'hello'}
    assert task['enqueued_at'] <= task['started_at'] <= task['finished_at']
    assert task['error'] is None


@pytest.mark.parametrize(
    ('flow', 'params', 'error'),
    [
        ('demo.fail', {'message': 'boom'}, 'DemoFailure: boom'),
        ('no.such.flow', {}, "unknown flow 'no.such.flow'; this worker runs: demo.cpu, demo.echo"),
        (
            'demo.sleep',
            {'seconds': 'soon'},
            "flow 'demo.sleep' got bad params: seconds: Input should be a valid number",
        ),
        (
            'demo.sleep',
            {'minutes': 1},
            "flow 'demo.sleep' got bad params: minutes: Unexpected keyword argument",
        ),
    ],
    ids=['error', 'unknown-flow', 'bad-param-type', 'unknown-param'],
)
async def test_failures_fail_at_once_and_are_never_retried(
    stack: Stack, flow: str, params: dict[str, object], error: str
) -> None:
    await stack.start_worker()
    job_id = await stack.enqueue(flow, params)

    with pytest.raises(FlowFailed) as raised:
        await result_of(stack, job_id)
    assert error in str(raised.value)
    [task] = await stack.wait_final([job_id])
    assert task['status'] == 'failed'
    assert error in task['error']
    assert len(await stack.attempts(job_id)) == 1


async def test_a_timeout_is_retried_once_then_fails(stack: Stack) -> None:
    await stack.start_worker()
    job_id = await stack.enqueue('test.slow')

    await stack.wait_final([job_id])
    first, second = await stack.attempts(job_id)
    assert (first['status'], first['error']) == ('retrying', 'timed out after 0.5s; running it once more')
    assert (second['status'], second['error']) == ('failed', 'timed out after 0.5s, the second time')
    assert await stack.redis.zcard(QUEUE) == 0


async def test_a_retried_timeout_can_succeed(stack: Stack) -> None:
    await stack.start_worker()
    job_id = await stack.enqueue('test.slow_once')

    assert await result_of(stack, job_id) == 2
    await stack.wait_final([job_id])
    assert [a['status'] for a in await stack.attempts(job_id)] == ['retrying', 'succeeded']


async def test_a_flow_may_ask_for_retries_up_to_max_tries(stack: Stack) -> None:
    await stack.start_worker('--max-tries', '3')
    ok = await stack.enqueue('test.flaky', {'succeed_on': 3})
    too_many = await stack.enqueue('test.flaky', {'succeed_on': 4})

    assert await result_of(stack, ok) == 3
    await stack.wait_final([ok, too_many])
    assert [a['status'] for a in await stack.attempts(ok)] == ['retrying', 'retrying', 'succeeded']
    attempts = await stack.attempts(too_many)
    assert [a['status'] for a in attempts] == ['retrying', 'retrying', 'failed']
    assert attempts[-1]['error'] == 'asked for a retry after attempt 3 of 3'


async def test_a_plain_arq_producer_needs_nothing_of_ours(stack: Stack, redis_server: object) -> None:
    await stack.start_worker()
    # what a foreign API server does: stock create_pool, default serializer, the documented queue key
    producer = await create_pool(RedisSettings.from_dsn(stack.env['REDIS_URL']))
    try:
        job = await producer.enqueue_job('run_flow', 'demo.echo', {'n': 1}, _queue_name='arq:queue:default')
        assert job is not None
        assert await job.result(timeout=30, poll_delay=0.05) == {'n': 1}
    finally:
        await producer.aclose()


async def test_the_enqueue_command_queues_and_waits(stack: Stack) -> None:
    await stack.start_worker()
    queued = flowworker('enqueue', 'demo.echo', '--params', '{"x": 1}', '--count', '3', env=stack.env)
    assert queued.returncode == 0, queued.stderr
    job_ids = queued.stdout.split()
    assert len(job_ids) == 3
    await stack.wait_final(job_ids)

    waited = flowworker('enqueue', 'demo.fail', '--wait', '30', env=stack.env)
    assert waited.returncode == 1
    assert json.loads(waited.stdout)['status'] == 'failed'

    bad = flowworker('enqueue', 'demo.echo', '--params', '[1]', env=stack.env)
    assert (bad.returncode, bad.stderr) == (2, 'flowworker: error: --params must be a JSON object\n')
