"""``flowworker heartbeat list|wait-idle|wait-pid|delete``: the heartbeat keys, for deploy tools.

The Ansible role runs it on every host it deploys, to find, drain, restart and remove instances,
as ``python -m flowworker.heartbeat_cli`` with the worker's virtualenv: that way it loads the
settings, redis-py and the heartbeat readers (``heartbeat.py``) and none of the worker's stack
(SQLAlchemy, asyncpg, the runner). ``flowworker heartbeat`` (``cli.py``) is the same command.

It needs the Redis settings only and prints one JSON object on stdout whatever happens: with
``msg`` when it exits 1 (Redis unreachable or refusing, no heartbeat from the new process) or 2
(bad usage or settings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import heartbeat
from .arguments import Parser, add_env_file, positive, seconds
from .infrastructure import REDIS_ERRORS, create_redis, describe_error
from .settings import Settings, SettingsError, load_settings

# seconds Redis has to answer a heartbeat command, beyond the time the command waits on purpose
REDIS_ANSWER_TIMEOUT = 10.0
DESCRIPTION = (
    'Read, await or delete the heartbeat keys arq:worker:<worker-id>, for deploy tools. '
    'Prints one JSON object on stdout, also on a timeout or an error (then with "msg", exit 1); '
    'needs the Redis settings only.'
)


def add_actions(parser: argparse.ArgumentParser) -> None:
    """The four actions, under ``flowworker heartbeat`` or ``python -m flowworker.heartbeat_cli``."""
    actions = parser.add_subparsers(dest='heartbeat_command', required=True, parser_class=Parser)
    listed = actions.add_parser('list', help='{"workers": {id: heartbeat}} (SCAN, never KEYS)')
    listed.add_argument('--match', default='*', metavar='GLOB', help="worker ids matching GLOB ('*')")
    idle = actions.add_parser(
        'wait-idle',
        help='wait until each key is gone, or says a state other than running with no job running; '
        'exit 0 also when some did not, listed in "timed_out"',
    )
    idle.add_argument('worker_ids', nargs='+', metavar='ID')
    pid = actions.add_parser(
        'wait-pid', help='wait until the key of ID says pid N in state running; exit 1 if it did not'
    )
    pid.add_argument('worker_id', metavar='ID')
    pid.add_argument('--pid', type=positive, required=True, metavar='N', help='the process id')
    for waiting in (idle, pid):
        waiting.add_argument(
            '--timeout', type=seconds, required=True, metavar='SECONDS', help='wait at most SECONDS'
        )
    removed = actions.add_parser('delete', help='delete the keys; {"deleted": [ids whose key existed]}')
    removed.add_argument('worker_ids', nargs='+', metavar='ID')
    removed.add_argument('--dry-run', action='store_true', help='delete nothing, report what would be')
    for action in (listed, idle, pid, removed):
        add_env_file(action)


def run(args: argparse.Namespace, prog: str = 'flowworker') -> int:
    try:
        settings = load_settings(args.env_file)
        settings.require_redis()
    except SettingsError as e:
        print(json.dumps({'msg': str(e)}))
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    command = args.heartbeat_command
    if command == 'list':
        return list_beats(settings, args.match)
    if command == 'wait-idle':
        return wait_idle(settings, args.worker_ids, args.timeout)
    if command == 'wait-pid':
        return wait_pid(settings, args.worker_id, args.pid, args.timeout)
    return delete(settings, args.worker_ids, args.dry_run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog='python -m flowworker.heartbeat_cli', description=DESCRIPTION)
    add_actions(parser)
    args = parser.parse_args(argv)
    args.env_file = getattr(args, 'env_file', None)
    return run(args, parser.prog)


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


def list_beats(settings: Settings, match: str) -> int:
    async def command(redis: Redis) -> Printed:
        beats = await heartbeat.beats(redis, match)
        return Printed({'workers': {worker_id: heartbeat.decode(raw) for worker_id, raw in beats.items()}})

    return _heartbeat(settings, command)


def wait_idle(settings: Settings, worker_ids: Sequence[str], timeout: float) -> int:
    async def command(redis: Redis) -> Printed:
        waited = await heartbeat.wait_idle(redis, worker_ids, timeout)
        busy = f'still busy after {timeout:g} s: {", ".join(waited.pending)}' if waited.pending else None
        result = {'workers': waited.workers, 'timed_out': waited.pending, 'elapsed': waited.elapsed}
        return Printed(result, notice=busy)

    return _heartbeat(settings, command, timeout)


def wait_pid(settings: Settings, worker_id: str, pid: int, timeout: float) -> int:
    async def command(redis: Redis) -> Printed:
        waited = await heartbeat.wait_pid(redis, worker_id, pid, timeout)
        result: dict[str, Any] = {'workers': waited.workers, 'elapsed': waited.elapsed}
        if not waited.pending:
            return Printed(result)
        return Printed(result, heartbeat.no_heartbeat(worker_id, pid, timeout, waited.workers[worker_id]))

    return _heartbeat(settings, command, timeout)


def delete(settings: Settings, worker_ids: Sequence[str], dry_run: bool) -> int:
    async def command(redis: Redis) -> Printed:
        return Printed({'deleted': await heartbeat.delete(redis, worker_ids, dry_run=dry_run)})

    return _heartbeat(settings, command)


if __name__ == '__main__':
    sys.exit(main())
