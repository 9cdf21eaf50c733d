"""Connections: the SQLAlchemy async engine (asyncpg) and the arq Redis pool.

``initialize()`` builds both from the settings; ``Infrastructure.shutdown()`` closes both.
SQLAlchemy and asyncpg load when an engine is made: a command that needs Redis alone
(``heartbeat_cli.py``) starts without them.

With ``REDIS_SENTINELS`` the Redis pool is redis-py's Sentinel pool, not arq's: arq's sentinel
branch leaves out TLS, the pool's retry settings and the sentinels' own AUTH. Its connections
ask the sentinels for the master each time they connect, so after a failover every connection
the old master closes (or that it answers READONLY, as a replica) comes back on the new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.pool import ConnectionPoolEntry

logger = logging.getLogger('flowworker.infrastructure')

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# Redis answers but refuses writes for now (out of memory, a read-only replica): wait and try again
REDIS_REFUSALS = (OutOfMemoryError, ReadOnlyError)
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
    """The Redis pool of ``settings`` once Redis answers a PING, trying ``connect_retries`` more
    times a second apart (arq's ``conn_retries``)."""
    redis_settings = settings.redis_settings()
    redis_settings.conn_retries = connect_retries
    # a command on a connection that broke (Redis restarted, a failover) is retried on a fresh
    # one; longer outages reach the worker's loops, which log and back off
    redis_settings.retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3)
    redis_settings.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    if not redis_settings.sentinel:
        return await create_pool(redis_settings, default_queue_name=settings.queue_key)
    redis = _sentinel_master(settings, redis_settings)
    where = f'the Redis master {settings.redis_sentinel_master!r} through the sentinels ' + ','.join(
        f'{host}:{port}' for host, port in settings.redis_sentinels
    )
    try:
        await _ping(redis, redis_settings, where)
    except BaseException:
        await redis.aclose()
        raise
    return redis


class SentinelArqRedis(ArqRedis):
    """An ArqRedis on the master the sentinels name; closing its pool closes its connections to the
    sentinels too (redis-py's Sentinel leaves them open)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        closing = close_connection_pool or (close_connection_pool is None and self.auto_close_connection_pool)
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if closing and isinstance(pool, SentinelConnectionPool):
            for sentinel in pool.sentinel_manager.sentinels:
                await sentinel.aclose()


def _sentinel_master(settings: Settings, redis_settings: RedisSettings) -> SentinelArqRedis:
    """The pool of the master, its connections made as arq's ``create_pool`` makes them (TLS,
    timeouts, retries), the sentinels reached with their own user, password and TLS."""
    tls = {
        'ssl': True,
        'ssl_cert_reqs': redis_settings.ssl_cert_reqs,
        'ssl_ca_certs': redis_settings.ssl_ca_certs,
        'ssl_check_hostname': redis_settings.ssl_check_hostname,
    }
    password = settings.redis_sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py is partly typed
        settings.redis_sentinels,
        sentinel_kwargs={
            'username': settings.redis_sentinel_username,
            'password': password.get_secret_value() if password else None,
            # a sentinel that does not answer is skipped for the next one
            'socket_connect_timeout': redis_settings.conn_timeout,
            'socket_timeout': redis_settings.conn_timeout,
            **(tls if settings.redis_sentinel_tls else {}),
        },
        db=redis_settings.database,
        username=redis_settings.username,
        password=redis_settings.password,
        encoding='utf8',
        socket_connect_timeout=redis_settings.conn_timeout,
        retry=redis_settings.retry,
        retry_on_timeout=redis_settings.retry_on_timeout,
        retry_on_error=redis_settings.retry_on_error,
        max_connections=redis_settings.max_connections,
        **(tls if redis_settings.ssl else {}),
    )
    redis = sentinel.master_for(redis_settings.sentinel_master, redis_class=SentinelArqRedis)
    assert isinstance(redis, SentinelArqRedis)
    redis.default_queue_name = settings.queue_key
    return redis


async def _ping(redis: Redis, redis_settings: RedisSettings, where: str) -> None:
    """PING until Redis answers, as arq's ``create_pool`` does: ``conn_retries`` more tries,
    ``conn_retry_delay`` seconds apart, each logged; the last error is raised."""
    for left in range(redis_settings.conn_retries, -1, -1):
        try:
            await redis.ping()
            return
        except REDIS_ERRORS as e:
            if not left:
                raise
            logger.warning('cannot reach %s (%s), %d retries remaining', where, describe_error(e), left)
            await asyncio.sleep(redis_settings.conn_retry_delay)


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


class _CountsReconnects(AbstractConnection):
    """Mixed into a Redis pool's connection class: counts each connect() of a connection object
    whose previous socket an error ended (the server closed it, a read or write failed or timed
    out) or went to another address (a Sentinel pool's connection following a failover: the pool
    closes its idle connections to the old master when a sentinel names a new one, before the old
    master, once demoted, would close them), not its first connect, nor one after a deliberate
    disconnect from the same server (a pub/sub closed, the pool shut down)."""

    reconnected: Callable[[], None]
    _lost = False
    _peer: tuple[object, object] | None = None

    async def connect(self) -> None:
        replacing = self._lost and not self.is_connected
        await super().connect()  # type: ignore[no-untyped-call]  # redis-py is partly typed
        peer = (getattr(self, 'host', None), getattr(self, 'port', None))
        moved = self._peer is not None and peer != self._peer
        self._peer = peer
        if replacing or moved:
            self._lost = False
            type(self).reconnected()

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError):
            self._lost = True
            raise

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().send_packed_command(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError):
            self._lost = True
            raise

    async def can_read_destructive(self) -> bool:
        # the pool asks before it hands out an idle connection: data or EOF on one means it broke
        try:
            unusable = bool(await super().can_read_destructive())  # type: ignore[no-untyped-call]
        except (RedisConnectionError, RedisTimeoutError):
            self._lost = True
            raise
        self._lost = self._lost or unusable
        return unusable


async def count_redis_reconnects(redis: Redis, reconnected: Callable[[], None]) -> None:
    """Call ``reconnected`` whenever a connection of ``redis``'s pool replaces one an error ended.

    The pool's connection class (TCP, TLS or Unix socket, as arq chose, or the Sentinel pool's
    SentinelManagedConnection, which asks the sentinels for the master before it connects) gets
    the counting mixin; the connections made so far (the start-up ping) are closed, so every
    later one counts.
    """
    pool = redis.connection_pool
    await pool.disconnect()
    pool.reset()  # type: ignore[no-untyped-call]
    base = pool.connection_class
    pool.connection_class = type(
        f'Counting{base.__name__}', (_CountsReconnects, base), {'reconnected': staticmethod(reconnected)}
    )


def count_database_reconnects(engine: AsyncEngine, recycle: float, reconnected: Callable[[], None]) -> None:
    """Call ``reconnected`` whenever an entry of ``engine``'s pool connects again: its connection was
    dropped as broken (a failed pre-ping at check-out, a disconnect seen by a statement, a failed
    reset at check-in) or retired with the rest of the pool after one of those (SQLAlchemy's
    pool-wide invalidation, for a failover or a restart kills them all). Call it before the
    engine's first connection, so every entry's first connect is seen and not counted.

    Not counted: an entry's first connection (start-up, growth under load), nor one replacing a
    connection that had reached ``recycle`` seconds (``DATABASE_POOL_RECYCLE``).
    """
    from sqlalchemy import event  # noqa: PLC0415  # see the module's docstring

    def connected(_: Any, entry: ConnectionPoolEntry) -> None:
        info = entry.record_info
        # the pool's own clock for its entries, which its recycle check reads
        started = getattr(entry, 'starttime', None)
        if info is None or started is None:
            return
        previous = info.get('flowworker_started')
        if previous is not None and not (recycle >= 0 and started - previous > recycle):
            reconnected()
        info['flowworker_started'] = started

    event.listen(engine.sync_engine.pool, 'connect', connected)


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
