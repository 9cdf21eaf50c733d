"""The operators' commands: ``flowworker status``, ``tasks``, ``cancel``, ``purge`` and ``heartbeat``.

Each connects with the worker's settings, does one thing and returns the exit code: 0 done, 1 it
could not (Redis or PostgreSQL unreachable, job not cancelled, purge not confirmed, no heartbeat
from the new process), and for ``status`` 3 when a queue has jobs and no live worker picks them.
``flowworker heartbeat`` (for the Ansible role) needs Redis only and prints one JSON object on
stdout whatever happens, with ``msg`` when it exits 1. ``cli.py`` parses the options.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from asyncpg import InterfaceError, PostgresError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from . import control, fleet, heartbeat, report
from .infrastructure import REDIS_ERRORS, Infrastructure, create_redis, describe_error, initialize
from .settings import Settings

T = TypeVar('T')
EXIT_STRANDED = 3
# seconds Redis has to answer a heartbeat command, beyond the time the command waits on purpose
REDIS_ANSWER_TIMEOUT = 10.0


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


@dataclass
class Printed:
    """What a ``flowworker heartbeat`` command prints: ``result`` as JSON, and a line on stderr."""

    result: dict[str, Any]
    failure: str | None = None  # exit 1; the result's msg
    notice: str | None = None  # exit 0


def _heartbeat(settings: Settings, command: Callable[[Redis], Awaitable[Printed]], wait: float = 0) -> int:
    """Run ``command`` on a Redis connection of its own (no waiting for Redis to come up)."""
    budget = wait + REDIS_ANSWER_TIMEOUT

    async def main() -> Printed:
        async with asyncio.timeout(budget):
            redis = await create_redis(settings, connect_retries=0)
            try:
                return await command(redis)
            finally:
                await redis.aclose(close_connection_pool=True)

    try:
        printed = asyncio.run(main())
    except TimeoutError:  # before REDIS_ERRORS, which holds OSError
        printed = Printed({}, f'cannot reach Redis: no answer within {budget:g} s')
    except REDIS_ERRORS as e:
        printed = Printed({}, f'cannot reach Redis: {describe_error(e)}')
    except RedisError as e:  # a refused command: WRONGTYPE, NOPERM, ...
        printed = Printed({}, f'Redis refused: {describe_error(e)}')
    if printed.failure is not None:
        printed.result['msg'] = printed.failure
    print(json.dumps(printed.result))
    if printed.notice is not None:
        print(f'flowworker: {printed.notice}', file=sys.stderr)
    if printed.failure is not None:
        print(f'flowworker: error: {printed.failure}', file=sys.stderr)
        return 1
    return 0


def heartbeat_list(settings: Settings, match: str) -> int:
    async def command(redis: Redis) -> Printed:
        beats = await heartbeat.beats(redis, match)
        return Printed({'workers': {worker_id: heartbeat.decode(raw) for worker_id, raw in beats.items()}})

    return _heartbeat(settings, command)


def heartbeat_wait_idle(settings: Settings, worker_ids: Sequence[str], timeout: float) -> int:
    async def command(redis: Redis) -> Printed:
        waited = await heartbeat.wait_idle(redis, worker_ids, timeout)
        busy = f'still busy after {timeout:g} s: {", ".join(waited.pending)}' if waited.pending else None
        result = {'workers': waited.workers, 'timed_out': waited.pending, 'elapsed': waited.elapsed}
        return Printed(result, notice=busy)

    return _heartbeat(settings, command, timeout)


def heartbeat_wait_pid(settings: Settings, worker_id: str, pid: int, timeout: float) -> int:
    async def command(redis: Redis) -> Printed:
        waited = await heartbeat.wait_pid(redis, worker_id, pid, timeout)
        result: dict[str, Any] = {'workers': waited.workers, 'elapsed': waited.elapsed}
        if not waited.pending:
            return Printed(result)
        return Printed(result, heartbeat.no_heartbeat(worker_id, pid, timeout, waited.workers[worker_id]))

    return _heartbeat(settings, command, timeout)


def heartbeat_delete(settings: Settings, worker_ids: Sequence[str], dry_run: bool) -> int:
    async def command(redis: Redis) -> Printed:
        return Printed({'deleted': await heartbeat.delete(redis, worker_ids, dry_run=dry_run)})

    return _heartbeat(settings, command)
