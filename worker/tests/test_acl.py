"""flowworker's Redis ACL users: what the worker, the monitor and the servers' own users (replica,
sentinel) may not do. The tests run as them; test_sentinel.py replicates and fails over with them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from flowworker.acl import acl_rules

from .servers import RedisServer

REFUSED = [
    ('FLUSHALL',),
    ('FLUSHDB',),
    ('CONFIG', 'GET', 'maxmemory'),
    ('CONFIG', 'SET', 'maxmemory', '1'),
    ('KEYS', 'arq:*'),
    ('SET', 'outside', '1'),
    ('EVAL', 'return 1', '0'),
    ('ACL', 'SETUSER', 'intruder', 'on', '>x', '+@all'),
    ('DEBUG', 'SLEEP', '0'),
    ('SHUTDOWN', 'NOSAVE'),
    ('MODULE', 'LIST'),
]


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize('user', ['worker', 'monitor', 'replica', 'sentinel'])
async def test_the_client_and_server_users_are_refused_what_they_do_not_need(
    admin: Redis, redis_server: RedisServer, user: str
) -> None:
    # ACL DRYRUN: what the user may run, asked without running it (SHUTDOWN among them)
    for command in REFUSED:
        answer = await admin.acl_dryrun(user, *command)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        assert b'no permissions' in answer, (user, command)
    # and as the user itself, the refusals a leaked env file would meet first
    client = Redis.from_url(redis_server.url_of(user))
    try:
        for command in REFUSED[:6]:
            with pytest.raises(NoPermissionError):
                await client.execute_command(*command)
    finally:
        await client.aclose()


async def test_the_worker_user_reads_and_writes_arq_keys_only(redis_server: RedisServer) -> None:
    worker = Redis.from_url(redis_server.worker_url)
    try:
        assert await worker.zadd('arq:queue:acl-test', {'job': 1}) == 1
        assert await worker.delete('arq:queue:acl-test') == 1
        with pytest.raises(NoPermissionError):
            await worker.get('flows:secret')
    finally:
        await worker.aclose()


async def test_the_monitor_user_may_not_subscribe(redis_server: RedisServer) -> None:
    monitor = Redis.from_url(redis_server.monitor_url)
    try:
        with pytest.raises(NoPermissionError):
            await monitor.publish('__keyspace@0__:arq:queue:default', 'zadd')
    finally:
        await monitor.aclose()


@pytest.mark.parametrize('user', ['replica', 'sentinel'])
async def test_the_server_users_reach_no_key(admin: Redis, user: str) -> None:
    for command in [('GET', 'arq:job:x'), ('ZRANGE', 'arq:queue:default', '0', '-1'), ('SCAN', '0')]:
        answer = await admin.acl_dryrun(user, *command)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        assert b'no permissions' in answer, (user, command)


def test_an_unknown_role_is_refused_naming_the_roles() -> None:
    with pytest.raises(ValueError, match='worker, monitor, admin, replica, sentinel'):
        acl_rules('producer')
    assert acl_rules('admin') == '~* &* +@all'


async def test_the_worker_user_runs_loaded_scripts_with_its_own_key_rights(redis_server: RedisServer) -> None:
    worker = Redis.from_url(redis_server.worker_url)
    try:
        # EVALSHA after SCRIPT LOAD, as batches.py does; EVAL stays refused (REFUSED above)
        # by name, as batches.py reaches each job's keys
        touch = worker.register_script("return redis.call('SET', ARGV[1], '1')")
        assert await touch(args=['arq:acl-test']) == b'OK'
        assert await worker.delete('arq:acl-test') == 1
        # a script reaches no key its caller could not: the rules hold inside it too
        with pytest.raises(ResponseError, match="can't access at least one of the keys"):
            await touch(args=['outside'])
    finally:
        await worker.aclose()
