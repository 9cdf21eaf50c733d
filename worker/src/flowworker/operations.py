"""The operators' commands: ``flowworker status``, ``tasks``, ``cancel`` and ``purge``.

Each connects with the worker's settings, does one thing and returns the exit code: 0 done, 1 it
could not (Redis or PostgreSQL unreachable, job not cancelled, purge not confirmed), and for
``status`` 3 when a queue has jobs and no live worker picks them. ``cli.py`` parses the options;
``flowworker heartbeat`` is ``heartbeat_cli.py``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from asyncpg import InterfaceError, PostgresError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from . import control, fleet, report
from .infrastructure import Infrastructure, describe_error, initialize
from .settings import Settings

T = TypeVar('T')
EXIT_STRANDED = 3


class Unreachable(Exception):
    """Redis or PostgreSQL did not answer; the message says which."""


def unreachable(e: BaseException) -> str:
    """One line: which backend failed, and why."""
    if isinstance(e, RedisError):
        backend = 'Redis'
    elif isinstance(e, SQLAlchemyError | PostgresError | InterfaceError):
        backend = 'PostgreSQL'
    else:
        backend = 'Redis or PostgreSQL'
    return f'cannot reach {backend}: {describe_error(e)}'


@asynccontextmanager
async def connected(settings: Settings, connect_retries: int = 0) -> AsyncIterator[Infrastructure]:
    """Redis and PostgreSQL for one command (by default no waiting for them); one line if they fail."""
    try:
        infra = await initialize(settings, connect_retries=connect_retries)
        try:
            yield infra
        finally:
            await infra.shutdown()
    except (RedisError, SQLAlchemyError, PostgresError, InterfaceError, OSError) as e:
        raise Unreachable(unreachable(e)) from None


def run(settings: Settings, operation: Callable[[Infrastructure], Awaitable[T]]) -> T:
    async def main() -> T:
        async with connected(settings) as infra:
            return await operation(infra)

    return asyncio.run(main())


def status(settings: Settings, as_json: bool) -> int:
    found = run(settings, lambda infra: fleet.fleet(infra.redis, infra.engine))
    print(found.model_dump_json(indent=2) if as_json else report.status(found))
    for line in report.stranded_lines(found):
        print(f'flowworker: {line}', file=sys.stderr)
    return EXIT_STRANDED if found.stranded else 0


def tasks(
    settings: Settings,
    *,
    status: str | None,
    flow: str | None,
    older_than: float | None,
    limit: int,
    as_json: bool,
) -> int:
    found = run(
        settings,
        lambda infra: fleet.tasks(infra.engine, status=status, flow=flow, older_than=older_than, limit=limit),
    )
    if as_json:
        print(json.dumps([task.model_dump(mode='json') for task in found], indent=2))
    else:
        print(report.tasks(found))
    return 0


def cancel(settings: Settings, job_id: str, wait: float) -> int:
    result = run(settings, lambda infra: control.cancel(infra.redis, job_id, wait))
    print(result.detail, file=sys.stdout if result.outcome == control.Outcome.cancelled else sys.stderr)
    return 0 if result.outcome == control.Outcome.cancelled else 1


def _confirm(question: str) -> bool:
    sys.stderr.write(f'{question} [y/N] ')
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in {'y', 'yes'}


def purge(settings: Settings, yes: bool) -> int:
    queue = settings.queue_name
    if not yes:
        waiting = run(settings, lambda infra: control.queued(infra.redis, queue))
        if not waiting:
            print(f'{settings.queue_key} is empty; nothing to remove')
            return 0
        question = f'Remove the jobs of {settings.queue_key} that are not running ({waiting} in the queue)?'
        if not _confirm(question):
            print('not confirmed; nothing removed', file=sys.stderr)
            return 1
    purged = run(settings, lambda infra: control.purge(infra.redis, queue))
    print(f'removed {purged.removed} jobs from {purged.queue} ({purged.running} running jobs left alone)')
    return 0
