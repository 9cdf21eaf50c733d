"""``flowworker health``: what a container's HEALTHCHECK runs, reading the worker's own health file."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from .conftest import Stack, flowworker
from .servers import RedisServer, WorkerProcess


async def start(stack: Stack, path: Path) -> tuple[WorkerProcess, dict[str, str]]:
    """A worker that writes ``path`` after each beat, every half second; its health settings."""
    env = {'FLOWWORKER_HEALTH_FILE': str(path), 'FLOWWORKER_HEARTBEAT_INTERVAL': '0.5'}
    worker = await stack.start_worker(FLOWWORKER_HEALTH_FILE=str(path), FLOWWORKER_HEARTBEAT_INTERVAL='0.5')
    return worker, env


def health(stack: Stack, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return flowworker('health', *args, env={**stack.env, **env})


async def until_health(stack: Stack, env: dict[str, str], code: int, timeout: float = 20) -> str:
    """The first answer that exits ``code``: stdout's one line."""
    async with asyncio.timeout(timeout):
        while (done := health(stack, env)).returncode != code:
            await asyncio.sleep(0.2)
    [line] = done.stdout.splitlines()
    return line


async def test_healthy_while_the_beats_reach_redis_then_not_until_they_do_again(
    stack: Stack, redis_server: RedisServer, tmp_path: Path
) -> None:
    worker, env = await start(stack, tmp_path / 'health.json')

    healthy = await until_health(stack, env, 0)
    assert healthy.startswith(f'worker {worker.worker_id} (pid {worker.pid}) running, last beat ')

    redis_server.stop()
    try:
        # the next beat cannot reach Redis (or hangs in its retries until the beat is too old)
        unhealthy = await until_health(stack, env, 1)
    finally:
        redis_server.start()
    assert 'cannot reach Redis' in unhealthy or 'last beat' in unhealthy, unhealthy
    assert worker.alive()
    await until_health(stack, env, 0, timeout=60)

    stale = health(stack, env, '--max-age', '0.001')
    assert stale.returncode == 1
    assert 's ago, more than 0.001s' in stale.stdout

    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    gone = health(stack, env)
    assert (gone.returncode, gone.stdout) == (1, f'worker {worker.worker_id} (pid {worker.pid}) is gone\n')


async def test_a_worker_that_stops_takes_its_health_file_with_it(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / 'health.json'
    worker, env = await start(stack, path)
    await until_health(stack, env, 0)

    assert worker.stop() == 0

    done = health(stack, env)
    assert done.returncode == 1
    assert done.stdout == f'no health file {path}: the worker has not beaten yet, or has stopped\n'
    path.write_text('{"pid": "not json enough"}')
    assert 'cannot read the health file' in health(stack, env).stdout


def test_without_a_health_file_setting_it_is_a_usage_error() -> None:
    done = flowworker('health', env={}, inherit=False)
    assert done.returncode == 2
    assert 'FLOWWORKER_HEALTH_FILE is not set' in done.stderr
