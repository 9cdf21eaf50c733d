"""``flowworker monitor``: the command, its settings and every endpoint, against real servers."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from arq.connections import ArqRedis
from fastapi.routing import APIRoute
from prometheus_client.parser import text_string_to_metric_families

from flowworker.infrastructure import Infrastructure, create_engine
from flowworker.monitor import create_app
from flowworker.settings import load_settings

from .conftest import QUEUE, Stack, flowworker
from .monitoring import TOKEN, MonitorProcess, known_mix
from .servers import RedisServer, free_port

API = '/api/v1/task_queue'


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, that it may stop."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop(save=False)


async def test_healthz_is_ok_when_redis_and_postgresql_answer(monitor: MonitorProcess) -> None:
    async with monitor.client() as client:
        response = await client.get('/healthz')
    assert (response.status_code, response.json()) == (200, {'status': 'ok'})


async def test_healthz_is_503_naming_what_does_not_answer(
    private_redis: RedisServer, database: dict[str, str], tmp_path: Path
) -> None:
    closed = f'postgresql://u:p@127.0.0.1:{free_port()}/app'
    env = {'DATABASE_URL': closed, 'REDIS_URL': private_redis.monitor_url}
    with MonitorProcess(env, tmp_path) as process:
        async with process.client() as client:
            response = await client.get('/healthz')
            assert response.status_code == 503
            assert response.json()['status'] == 'unavailable'
            assert set(response.json()['failed']) == {'database'}

            private_redis.stop(save=False)
            response = await client.get('/healthz')
            assert response.status_code == 503
            assert set(response.json()['failed']) == {'database', 'redis'}
    assert 'p@127.0.0.1' not in process.output()


# (environment, arguments, the one line expected on stderr)
BAD = [
    ({'MONITOR_PORT': '0'}, [], 'MONITOR_PORT: Input should be greater than or equal to 1'),
    ({}, ['--port', 'http'], '--port: Input should be a valid integer'),
    ({'MONITOR_TOKEN': 'hunter2'}, [], 'MONITOR_TOKEN: must be at least 16 characters'),
    ({'REDIS_URL': None}, [], 'REDIS_URL is not set (nor REDIS_HOST, nor REDIS_SENTINELS)'),
    ({'DATABASE_URL': None}, [], 'DATABASE_URL is not set'),
]


@pytest.mark.parametrize(('environment', 'args', 'message'), BAD, ids=[m.split(':')[0] for *_, m in BAD])
def test_a_bad_setting_is_one_line_and_exit_2(
    environment: dict[str, str | None], args: list[str], message: str
) -> None:
    base = {'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/app', 'REDIS_URL': 'redis://127.0.0.1:1/0'}
    env = {k: v for k, v in {**base, **environment}.items() if v is not None}

    result = flowworker('monitor', *args, env=env, inherit=False)

    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert message in line
    assert 'hunter2' not in line


def test_without_the_monitor_extra_the_worker_runs_and_monitor_says_what_to_install() -> None:
    """The web stack is an optional extra: the core commands import without it."""
    no_web = "import sys; sys.modules.update(dict.fromkeys(['fastapi', 'uvicorn', 'jinja2'])); "
    env = {'PATH': '/usr/bin:/bin', 'DATABASE_URL': 'postgresql://u:p@h/d', 'REDIS_URL': 'redis://h'}

    def flowworker(*args: str) -> subprocess.CompletedProcess[str]:
        code = f'{no_web}from flowworker.cli import main; sys.exit(main({list(args)!r}))'
        return subprocess.run(
            [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=30, check=False
        )

    assert flowworker('worker', '--help').returncode == 0
    result = flowworker('monitor')
    assert result.returncode == 2
    assert re.fullmatch(
        r'flowworker: error: flowworker monitor needs the monitor extra '
        r'\((fastapi|uvicorn|jinja2) is not installed\): pip install "flowworker\[monitor\]"\n',
        result.stderr,
    )


async def test_the_api_shows_the_known_mix(stack: Stack, monitor: MonitorProcess) -> None:
    mix = await known_mix(stack)
    async with monitor.client() as client:
        [worker] = (await client.get(f'{API}/workers')).json()['workers']
        queues = (await client.get(f'{API}/queues')).json()
        tasks = (await client.get(f'{API}/tasks')).json()['tasks']
        running, failed, queued = [
            (await client.get(f'{API}/tasks/{job_id}')).json()
            for job_id in (mix.running, mix.failed[0], mix.queued[0])
        ]

        async def job_ids(**params: str) -> list[str]:
            response = await client.get(f'{API}/tasks', params=params)
            assert response.status_code == 200, response.text
            return [task['job_id'] for task in response.json()['tasks']]

        assert await job_ids(status='running') == [mix.running]
        assert sorted(await job_ids(status='failed')) == sorted(mix.failed)
        assert sorted(await job_ids(flow='demo.echo')) == sorted(mix.succeeded)
        assert await job_ids(status='running', older_than='1h') == []
        assert len(await job_ids(limit='2')) == 2
        assert (await client.get(f'{API}/tasks', params={'status': 'stuck'})).status_code == 422
        assert (await client.get(f'{API}/tasks', params={'older_than': 'soon'})).status_code == 422

    assert worker['worker_id'] == mix.worker.worker_id
    assert (worker['host'], worker['pid'], worker['queue']) == (
        socket.gethostname(),
        mix.worker.pid,
        'default',
    )
    assert (worker['state'], worker['database'], worker['max_jobs']) == ('running', 'ok', 1)
    assert (worker['running'], worker['completed'], worker['failed']) == (1, 3, 2)
    assert 0 <= worker['heartbeat_age'] < 30

    assert 0 < queues['queues'][0].pop('oldest_ready_age') < 30
    assert queues['queues'] == [
        {
            'name': 'default',
            'key': 'arq:queue:default',
            'length': 3,  # the running job and the two queued
            'deferred': 0,
            'ready': 2,
            'running': 1,
            'workers': 1,
            'picking': 1,
            'stranded': False,
        }
    ]
    for rate in queues['rates']:
        assert (rate['succeeded'], rate['failed'], rate['cancelled']) == (3, 2, 0), rate
        assert rate['failure_rate'] == 0.4
        assert rate['completion_rate'] == 3 / rate['seconds']
    assert [rate['window'] for rate in queues['rates']] == ['1m', '5m', '15m']

    assert sorted(task['job_id'] for task in tasks) == sorted(mix.recorded)
    assert [(a['attempt'], a['status']) for a in running['attempts']] == [(1, 'running')]
    assert (running['job_id'], running['in_queue']) == (mix.running, True)
    assert (failed['in_queue'], failed['attempts'][0]['error']) == (
        False,
        'DemoFailure: demo.fail always fails',
    )
    assert (queued['in_queue'], queued['attempts']) == (True, [])  # waits behind the running job
    by_id = {task['job_id']: task for task in tasks}
    assert by_id[mix.running]['status'] == 'running'
    assert by_id[mix.running]['finished_at'] is None
    assert by_id[mix.failed[0]]['error'] == 'DemoFailure: demo.fail always fails'
    assert by_id[mix.succeeded[1]]['result'] == {'n': 1}


async def test_metrics_are_prometheus_text_with_the_guides_and_the_queue_latency(
    stack: Stack, monitor: MonitorProcess
) -> None:
    mix = await known_mix(stack)
    async with monitor.client() as client:
        response = await client.get('/metrics')
    assert response.status_code == 200
    assert response.headers['content-type'].startswith('text/plain')

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    assert samples[('flowworker_workers', (('queue', 'default'), ('state', 'running')))] == 1
    assert samples[('flowworker_workers', (('queue', 'default'), ('state', 'draining')))] == 0
    assert samples[('flowworker_queue_length', (('queue', 'default'),))] == 3
    for state, jobs in (('ready', 2), ('deferred', 0), ('in_progress', 1)):
        assert samples[('flowworker_queue_jobs', (('queue', 'default'), ('state', state)))] == jobs
    assert 0 < samples[('flowworker_queue_oldest_ready_age_seconds', (('queue', 'default'),))] < 30
    labels = (('host', socket.gethostname()), ('queue', 'default'), ('worker_id', mix.worker.worker_id))
    assert 0 <= samples[('flowworker_worker_heartbeat_age_seconds', labels)] < 30
    names = {name for name, _ in samples}
    assert names == {
        'flowworker_workers',
        'flowworker_queue_length',
        'flowworker_queue_jobs',
        'flowworker_queue_oldest_ready_age_seconds',
        'flowworker_worker_heartbeat_age_seconds',
    }


ENDPOINTS = {
    f'{API}/workers': {'get'},
    f'{API}/queues': {'get'},
    f'{API}/redis': {'get'},
    f'{API}/tasks': {'get'},
    f'{API}/tasks/{{job_id}}': {'get'},
    f'{API}/tasks/{{job_id}}/cancel': {'post'},
    '/workers': {'get'},
    '/tasks/{job_id}': {'get'},
    '/tasks/{job_id}/cancel': {'post'},
    '/metrics': {'get'},
    '/healthz': {'get'},
}


async def test_the_openapi_document_lists_exactly_the_endpoints_and_they_answer(
    monitor: MonitorProcess,
) -> None:
    settings = load_settings(database_url='postgresql://u:p@127.0.0.1:1/d', redis_url='redis://127.0.0.1:1')
    infra = Infrastructure(settings, create_engine(settings), ArqRedis())  # connects to nothing
    routes = {
        route.path: {method.lower() for method in route.methods or ()}
        for route in create_app(infra).routes
        if isinstance(route, APIRoute) and route.include_in_schema
    }
    await infra.shutdown()
    assert routes == ENDPOINTS
    async with monitor.client() as client:
        document = (await client.get('/openapi.json')).json()
        assert {path: set(methods) for path, methods in document['paths'].items()} == ENDPOINTS
        for path, methods in document['paths'].items():
            for method in methods:
                response = await client.request(method, path.replace('{job_id}', 'no-such-job'))
                # the cancels are refused without a token, a job that does not exist is not found,
                # everything else answers
                expected = 401 if method == 'post' else 404 if '{job_id}' in path else 200
                assert response.status_code == expected, (path, response.text)
        assert (await client.get('/docs')).status_code == 404  # Swagger UI would load from a CDN
    assert document['info']['title'] == 'flowworker monitor'
    cancel = document['paths'][f'{API}/tasks/{{job_id}}/cancel']['post']
    assert set(cancel['responses']) >= {'200', '202', '401', '404', '409'}
    for code in ('200', '202', '404', '409'):
        schema = cancel['responses'][code]['content']['application/json']['schema']
        assert schema == {'$ref': '#/components/schemas/Cancelled'}
    assert cancel['security'] == [{'HTTPBearer': []}]


async def test_cancel_needs_the_token_and_records_the_job_cancelled(
    stack: Stack, monitor: MonitorProcess
) -> None:
    mix = await known_mix(stack)
    cancel = f'{API}/tasks/{mix.running}/cancel'
    async with monitor.client() as anonymous, monitor.client('wrong-token-0123456789') as wrong:
        for client in (anonymous, wrong):
            response = await client.post(cancel)
            assert response.status_code == 401
            assert response.headers['www-authenticate'] == 'Bearer'
    assert (await stack.attempts(mix.running))[-1]['status'] == 'running'

    async with monitor.client(TOKEN) as client:
        response = await client.post(cancel)
        assert (response.status_code, response.json()['outcome']) == (200, 'cancelled'), response.text
        [task] = await stack.wait_final([mix.running])
        assert (task['status'], task['error']) == ('cancelled', 'aborted')

        again = await client.post(cancel)
        assert (again.status_code, again.json()['outcome']) == (409, 'finished')
        unknown = await client.post(f'{API}/tasks/no-such-job/cancel')
        assert (unknown.status_code, unknown.json()['outcome']) == (404, 'not_found')
    assert TOKEN not in monitor.output()
    assert f'cancel of job {mix.running} asked from 127.0.0.1: cancelled' in monitor.output()


async def test_the_task_pages_cancel_form_needs_the_token_and_cancels(
    stack: Stack, monitor: MonitorProcess
) -> None:
    mix = await known_mix(stack)
    page = f'/tasks/{mix.running}'
    async with monitor.client() as client:
        shown = await client.get(page)
        assert shown.status_code == 200
        assert f'<form class="cancel" method="post" action="{page}/cancel">' in shown.text
        for form in ({}, {'token': 'wrong-token-0123456789'}, {'token': TOKEN[:-1]}):
            refused = await client.post(f'{page}/cancel', data=form)
            assert refused.status_code == 401, form
            assert refused.headers['content-type'].startswith('text/html')
            assert f'Job {mix.running} was not cancelled' in refused.text
        assert (await stack.attempts(mix.running))[-1]['status'] == 'running'

        cancelled = await client.post(f'{page}/cancel', data={'token': TOKEN})
        assert cancelled.status_code == 200, cancelled.text
        assert f'job {mix.running} cancelled' in cancelled.text
        [task] = await stack.wait_final([mix.running])
        assert (task['status'], task['error']) == ('cancelled', 'aborted')
        assert 'type="password"' not in (await client.get(page)).text  # nothing left to cancel
    assert TOKEN not in monitor.output()
    assert f'cancel of job {mix.running} refused to 127.0.0.1: no valid token' in monitor.output()
    assert f'cancel of job {mix.running} asked from 127.0.0.1: cancelled' in monitor.output()


READS = [
    '/workers',
    '/metrics',
    '/openapi.json',
    *(f'{API}/{name}' for name in ('workers', 'queues', 'tasks')),
]
READ_TOKEN = 'read-token-0123456789abcdef'


async def test_with_a_read_token_every_read_needs_it_and_task_data_can_be_left_out(
    stack: Stack, redis_server: RedisServer, database: dict[str, str], tmp_path: Path
) -> None:
    mix = await known_mix(stack)
    env = {
        'DATABASE_URL': database['worker'],
        'REDIS_URL': redis_server.monitor_url,
        'MONITOR_TOKEN': TOKEN,
        'MONITOR_READ_TOKEN': READ_TOKEN,
        'MONITOR_SHOW_TASK_DATA': 'false',
    }
    reads = [*READS, f'/tasks/{mix.failed[0]}', f'{API}/tasks/{mix.failed[0]}']
    with MonitorProcess(env, tmp_path) as process:
        async with process.client() as anonymous, process.client('wrong-token-0123456789') as wrong:
            for path in reads:
                for client in (anonymous, wrong):
                    refused = await client.get(path)
                    assert refused.status_code == 401, path
                    assert refused.headers['www-authenticate'] == 'Bearer, Basic realm="flowworker monitor"'
                    assert refused.headers['x-frame-options'] == 'DENY'
            assert (await anonymous.get('/healthz')).status_code == 200
        basic = httpx.AsyncClient(base_url=process.url, auth=('anyone', READ_TOKEN), timeout=30)
        async with process.client(READ_TOKEN) as reader, process.client(TOKEN) as operator, basic:
            for path in reads:
                for client in (reader, operator, basic):
                    assert (await client.get(path)).status_code == 200, path
            tasks = (await reader.get(f'{API}/tasks')).json()['tasks']
            failed = [task for task in tasks if task['job_id'] in mix.failed]
            assert [task['status'] for task in failed] == ['failed', 'failed']
            assert all(task['result'] is None and task['error'] is None for task in tasks)
            for job_id in (mix.failed[0], mix.succeeded[0]):
                [attempt] = (await reader.get(f'{API}/tasks/{job_id}')).json()['attempts']
                assert (attempt['error'], attempt['result']) == (None, None)
            for path in ('/workers', f'/tasks/{mix.failed[0]}', f'/tasks/{mix.succeeded[0]}'):
                shown = (await reader.get(path)).text
                assert mix.failed[0] in shown or mix.succeeded[0] in shown
                assert 'DemoFailure' not in shown
                assert '"n": 0' not in shown
                assert 'hidden (MONITOR_SHOW_TASK_DATA=false)' in shown
            # the read token is not the cancel token
            assert (await reader.post(f'{API}/tasks/{mix.running}/cancel')).status_code == 401
    assert READ_TOKEN not in process.output()


async def test_every_response_has_the_security_headers(monitor: MonitorProcess) -> None:
    async with monitor.client() as client:
        for path in ('/healthz', '/workers', f'{API}/tasks', '/no-such-page'):
            headers = (await client.get(path)).headers
            assert headers['content-security-policy'].startswith("default-src 'none'")
            assert headers['x-content-type-options'] == 'nosniff'
            assert headers['x-frame-options'] == 'DENY'
            assert headers['referrer-policy'] == 'no-referrer'
            assert headers['cache-control'] == 'no-store'


async def test_without_a_token_configured_cancel_is_refused_to_everyone(
    stack: Stack, redis_server: RedisServer, database: dict[str, str], tmp_path: Path
) -> None:
    job_id = await stack.enqueue('demo.echo')
    env = {'DATABASE_URL': database['worker'], 'REDIS_URL': redis_server.monitor_url}
    process = MonitorProcess(env, tmp_path)
    async with process.client(TOKEN) as client:
        response = await client.post(f'{API}/tasks/{job_id}/cancel')
        page = await client.get(f'/tasks/{job_id}')
        form = await client.post(f'/tasks/{job_id}/cancel', data={'token': TOKEN})
    assert process.stop() == 0  # SIGTERM
    assert response.status_code == 401
    assert response.json()['detail'] == 'cancel is disabled: the service has no MONITOR_TOKEN'
    assert page.status_code == 200
    assert 'queued, not started yet' in page.text
    assert '<form' not in page.text
    assert form.status_code == 401
    assert 'not cancelled: the service has no MONITOR_TOKEN' in form.text
    assert await stack.redis.zcard(QUEUE) == 1


def test_a_monitor_whose_port_is_taken_exits_1(redis_server: RedisServer, database: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {
            'DATABASE_URL': database['worker'],
            'REDIS_URL': redis_server.monitor_url,
            'MONITOR_PORT': port,
        }
        result = flowworker('monitor', env=env)
    assert result.returncode == 1
    assert 'address already in use' in result.stderr


def test_an_empty_token_disables_cancel_like_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('MONITOR_TOKEN', '')
    assert load_settings().monitor_token is None
