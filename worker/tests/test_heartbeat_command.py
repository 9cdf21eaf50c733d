"""``flowworker heartbeat``: what the Ansible role reads, awaits and deletes, against the real Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from .conftest import flowworker
from .servers import RedisServer


def beat(pid: int, state: str = 'running', running: int = 0) -> str:
    return json.dumps({'pid': pid, 'state': state, 'jobs': {'running': running, 'completed': 0}})


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    return {'REDIS_URL': redis_server.worker_url}


def heartbeat(*args: str, env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    """Exit code, the one JSON object on stdout, and stderr."""
    done = flowworker('heartbeat', *args, env=env, inherit=False)
    [line] = done.stdout.splitlines()
    return done.returncode, json.loads(line), done.stderr


async def first_read(redis: Redis) -> None:
    """Return once the command has read the heartbeats once (its connection's last command is MGET)."""
    async with asyncio.timeout(20):
        while True:
            if any(client['cmd'] == 'mget' for client in await redis.client_list()):
                return
            await asyncio.sleep(0.02)


async def test_list_returns_the_heartbeats_that_match(redis: Redis, env: dict[str, str]) -> None:
    await redis.set('arq:worker:web-1:10', beat(10))
    await redis.set('arq:worker:web-2:20', beat(20, 'draining', 1))
    await redis.set('arq:worker:batch-1:30', 'not json')
    await redis.set('arq:queue:default:not-a-worker', 'x')

    every, web = await asyncio.gather(
        asyncio.to_thread(heartbeat, 'list', env=env),
        asyncio.to_thread(heartbeat, 'list', '--match', 'web-*', env=env),
    )

    assert every == (
        0,
        {
            'workers': {
                'batch-1:30': {'raw': 'not json'},
                'web-1:10': json.loads(beat(10)),
                'web-2:20': json.loads(beat(20, 'draining', 1)),
            }
        },
        '',
    )
    assert web[0] == 0
    assert list(web[1]['workers']) == ['web-1:10', 'web-2:20']


async def test_wait_idle_returns_once_each_key_is_idle_or_gone(redis: Redis, env: dict[str, str]) -> None:
    await redis.set('arq:worker:quieted', beat(1, 'running', 1))
    await redis.set('arq:worker:stopped-picking', beat(2, 'draining', 0))
    waiting = asyncio.create_task(
        asyncio.to_thread(
            heartbeat, 'wait-idle', 'quieted', 'stopped-picking', 'gone', '--timeout', '20', env=env
        )
    )
    await first_read(redis)
    await redis.set('arq:worker:quieted', beat(1, 'draining', 0))

    code, result, stderr = await waiting

    assert (code, result['timed_out'], stderr) == (0, [], '')
    assert result['workers'] == {
        'quieted': json.loads(beat(1, 'draining', 0)),
        'stopped-picking': json.loads(beat(2, 'draining', 0)),
        'gone': None,
    }
    assert 0.5 <= result['elapsed'] < 5  # the second read, every 0.5 s


async def test_wait_idle_reports_the_busy_ones_and_exits_0(redis: Redis, env: dict[str, str]) -> None:
    await redis.set('arq:worker:jobs-left', beat(1, 'draining', 2))
    await redis.set('arq:worker:still-picking', beat(2, 'running', 0))
    await redis.set('arq:worker:stopped-picking', beat(3, 'draining', 0))

    code, result, stderr = heartbeat(
        'wait-idle', 'jobs-left', 'still-picking', 'stopped-picking', '--timeout', '0.3', env=env
    )

    assert code == 0  # the caller stops the busy ones anyway
    assert result['timed_out'] == ['jobs-left', 'still-picking']
    assert result['workers'] == {
        'jobs-left': json.loads(beat(1, 'draining', 2)),
        'still-picking': json.loads(beat(2, 'running', 0)),
        'stopped-picking': json.loads(beat(3, 'draining', 0)),
    }
    assert result['elapsed'] >= 0.3
    assert stderr == 'flowworker: still busy after 0.3 s: jobs-left, still-picking\n'


async def test_wait_pid_returns_when_the_new_process_beats(redis: Redis, env: dict[str, str]) -> None:
    await redis.set('arq:worker:web-1', beat(111))  # the process before the restart
    waiting = asyncio.create_task(
        asyncio.to_thread(heartbeat, 'wait-pid', 'web-1', '--pid', '222', '--timeout', '20', env=env)
    )
    await first_read(redis)
    await redis.set('arq:worker:web-1', beat(222))

    code, result, stderr = await waiting

    assert (code, stderr) == (0, '')
    assert result['workers'] == {'web-1': json.loads(beat(222))}
    assert 0.25 <= result['elapsed'] < 5  # the second read, every 0.25 s


async def test_wait_pid_times_out_with_exit_1_naming_the_last_heartbeat(
    redis: Redis, env: dict[str, str]
) -> None:
    await redis.set('arq:worker:web-2', beat(222, 'draining'))

    last_seen = {
        'web-1': (None, 'none'),
        'web-2': (json.loads(beat(222, 'draining')), 'pid 222 in state draining'),
    }

    results = await asyncio.gather(
        *(
            asyncio.to_thread(heartbeat, 'wait-pid', worker_id, '--pid', '222', '--timeout', '0.3', env=env)
            for worker_id in last_seen
        )
    )

    for (worker_id, (payload, last)), (code, result, stderr) in zip(last_seen.items(), results, strict=True):
        message = f'no heartbeat from {worker_id} with pid 222 within 0.3 s (last heartbeat: {last})'
        assert code == 1
        assert result['msg'] == message
        assert result['workers'] == {worker_id: payload}
        assert result['elapsed'] >= 0.3
        assert stderr == f'flowworker: error: {message}\n'


async def test_delete_reports_the_keys_that_existed_and_dry_run_deletes_none(
    redis: Redis, env: dict[str, str]
) -> None:
    await redis.set('arq:worker:old-1', beat(1))
    await redis.set('arq:worker:old-2', beat(2))

    assert heartbeat('delete', 'old-1', 'old-2', 'never', '--dry-run', env=env) == (
        0,
        {'deleted': ['old-1', 'old-2']},
        '',
    )
    assert await redis.exists('arq:worker:old-1', 'arq:worker:old-2') == 2

    assert heartbeat('delete', 'old-1', 'never', env=env)[:2] == (0, {'deleted': ['old-1']})
    assert (await redis.exists('arq:worker:old-1'), await redis.exists('arq:worker:old-2')) == (0, 1)


def test_unreachable_redis_is_exit_1_with_one_line_and_msg() -> None:
    code, result, stderr = heartbeat('list', env={'REDIS_URL': 'redis://:hunter2@127.0.0.1:1/0'})

    assert code == 1
    [line] = stderr.splitlines()
    assert line.startswith('flowworker: error: cannot reach Redis: ConnectionError:')
    assert result == {'msg': line.removeprefix('flowworker: error: ')}
    assert 'hunter2' not in line


def test_without_redis_url_is_exit_2_as_for_every_command() -> None:
    done = flowworker('heartbeat', 'delete', 'web-1', env={}, inherit=False)

    assert done.returncode == 2
    assert done.stderr == 'flowworker: error: REDIS_URL is not set (nor REDIS_HOST, nor REDIS_SENTINELS)\n'
    assert json.loads(done.stdout) == {'msg': 'REDIS_URL is not set (nor REDIS_HOST, nor REDIS_SENTINELS)'}


async def test_the_deploy_tools_entry_point_is_the_same_command_without_the_database_stack(
    redis: Redis, env: dict[str, str]
) -> None:
    """The role runs ``python -I -m flowworker.heartbeat_cli`` on every host it deploys."""
    await redis.set('arq:worker:web-1:10', beat(10))
    loads = (
        'import json, sys; from flowworker import heartbeat_cli; code = heartbeat_cli.main(sys.argv[1:]); '
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'asyncpg', 'arq'})),"
        ' file=sys.stderr); sys.exit(code)'
    )
    bare = {'PATH': '/usr/bin:/bin', **env}
    direct, measured = await asyncio.gather(
        asyncio.to_thread(
            subprocess.run,
            [sys.executable, '-I', '-m', 'flowworker.heartbeat_cli', 'list', '--match', 'web-*'],
            env=bare,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ),
        asyncio.to_thread(
            subprocess.run,
            [sys.executable, '-c', loads, 'list'],
            env=bare,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ),
    )

    assert direct.returncode == 0, direct.stderr
    assert (0, json.loads(direct.stdout), '') == heartbeat('list', '--match', 'web-*', env=env)
    assert measured.returncode == 0, measured.stderr
    # arq's connection settings and redis-py only: SQLAlchemy and asyncpg stay out
    assert json.loads(measured.stderr) == ['arq']
