"""The task-record schema: migrations run by its owner, a worker role with DML rights only."""

from __future__ import annotations

import asyncpg
import pytest

from flowworker.infrastructure import initialize

from .conftest import OWNER, Stack, flowworker
from .servers import PostgresServer, RedisServer


async def create_database(postgres_server: PostgresServer, name: str) -> str:
    conn = await asyncpg.connect(postgres_server.dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS {name}')
        await conn.execute(f'CREATE DATABASE {name} OWNER {OWNER}')
    finally:
        await conn.close()
    return postgres_server.dsn(OWNER, 'owner-secret', name)


async def test_upgrade_twice_is_a_no_op(postgres_server: PostgresServer, database: dict[str, str]) -> None:
    url = await create_database(postgres_server, 'flowworker_upgrade')

    first = flowworker('db', 'upgrade', env={'DATABASE_URL': url})
    second = flowworker('db', 'upgrade', env={'DATABASE_URL': url})

    assert (first.returncode, first.stdout) == (0, 'applied migrations 1, 2, 3\n')
    assert (second.returncode, second.stdout) == (0, 'schema is up to date\n')
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval('SELECT count(*) FROM flowworker_schema') == 3
    finally:
        await conn.close()


async def test_the_worker_role_cannot_change_the_schema(stack: Stack) -> None:
    # every worker in these tests runs as this role; it may read and write records, nothing more
    conn = await asyncpg.connect(stack.env['DATABASE_URL'])
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute('CREATE TABLE intruder (id int)')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute('DELETE FROM flow_task_attempts')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute('DROP TABLE flow_task_attempts')
    finally:
        await conn.close()


async def test_a_worker_refuses_a_database_without_the_schema(
    stack: Stack, postgres_server: PostgresServer
) -> None:
    url = await create_database(postgres_server, 'flowworker_empty')
    worker = await stack.start_worker(wait=False, DATABASE_URL=url)

    assert worker.wait(30) == 2
    assert worker.output() == (
        'flowworker: error: the database schema is at version 0, this worker needs 3: '
        'run `flowworker db upgrade` as the schema owner\n'
    )
    assert await stack.redis.keys('arq:worker:*') == []


async def test_initialize_reads_the_env_file(stack: Stack, redis_server: RedisServer) -> None:
    env_file = stack.logs / 'worker.env'
    env_file.write_text(f'DATABASE_URL={stack.env["DATABASE_URL"]}\nREDIS_URL={redis_server.worker_url}\n')

    infra = await initialize(env_file=env_file)
    try:
        assert await infra.redis.ping()
        async with infra.engine.connect() as conn:
            assert (await conn.exec_driver_sql('SELECT current_user')).scalar() == 'flowworker_worker'
    finally:
        await infra.shutdown()
