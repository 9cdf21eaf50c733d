"""``flowworker monitor``: the command, its settings and ``/healthz``, against real servers."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import flowworker
from .monitoring import MonitorProcess
from .servers import RedisServer, free_port


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
    with MonitorProcess({'DATABASE_URL': closed, 'REDIS_URL': private_redis.url}, tmp_path) as process:
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
    ({'REDIS_URL': None}, [], 'REDIS_URL is not set (nor REDIS_HOST)'),
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
    no_web = "import sys; sys.modules.update(dict.fromkeys(['fastapi', 'uvicorn', 'prometheus_client'])); "
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
        r'\((fastapi|uvicorn|prometheus_client) is not installed\): pip install "flowworker\[monitor\]"\n',
        result.stderr,
    )
