"""Connections: the SQLAlchemy async engine (asyncpg) and the arq Redis pool.

``initialize()`` builds both from the settings; ``Infrastructure.shutdown()`` closes both.
SQLAlchemy and asyncpg load when an engine is made: a command that needs Redis alone
(``heartbeat_cli.py``) starts without them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arq.connections import ArqRedis, create_pool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
DATABASE_CONNECT_TIMEOUT = 10
DATABASE_COMMAND_TIMEOUT = 30


@dataclass
class Infrastructure:
    settings: Settings
    engine: AsyncEngine
    redis: ArqRedis

    async def shutdown(self) -> None:
        await self.redis.aclose(close_connection_pool=True)
        await self.engine.dispose()


def create_engine(settings: Settings, application_name: str = 'flowworker') -> AsyncEngine:
    """The SQLAlchemy pool; its connections show ``application_name`` in pg_stat_activity."""
    from sqlalchemy.ext.asyncio import create_async_engine  # noqa: PLC0415  # see the docstring above

    url, connect_args = settings.sqlalchemy_url()
    return create_async_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_recycle=settings.database_pool_recycle,
        pool_pre_ping=True,
        connect_args={
            'timeout': DATABASE_CONNECT_TIMEOUT,
            'command_timeout': DATABASE_COMMAND_TIMEOUT,
            'server_settings': {'application_name': application_name[:63]},
            **connect_args,
        },
        json_serializer=lambda value: json.dumps(value, default=repr),
    )


async def create_redis(settings: Settings, connect_retries: int = 5) -> ArqRedis:
    redis_settings = settings.redis_settings()
    redis_settings.conn_retries = connect_retries
    # a command on a connection that broke (Redis restarted) is retried on a fresh one;
    # longer outages reach the worker's loops, which log and back off
    redis_settings.retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3)
    redis_settings.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    return await create_pool(redis_settings, default_queue_name=settings.queue_key)


async def initialize(
    settings: Settings | None = None,
    *,
    env_file: Path | None = None,
    connect_retries: int = 5,
    application_name: str = 'flowworker',
    **overrides: Any,
) -> Infrastructure:
    """Connect to PostgreSQL and Redis with ``settings`` (or those loaded from ``env_file``)."""
    settings = settings or load_settings(env_file, **overrides)
    settings.require_database()
    settings.require_redis()
    engine = create_engine(settings, application_name)
    try:
        redis = await create_redis(settings, connect_retries)
    except BaseException:
        await engine.dispose()
        raise
    return Infrastructure(settings, engine, redis)


def backoff(first: float = 0.5, cap: float = 10.0) -> Iterator[float]:
    """Delays for retrying a lost connection: doubling from ``first`` up to ``cap`` seconds."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


def describe_error(e: BaseException) -> str:
    """One line on why a call failed, without SQLAlchemy's statement and parameters."""
    orig = getattr(e, 'orig', None) or e
    return f'{type(orig).__name__}: {orig}'.splitlines()[0]
