"""The ``flowworker`` command: ``worker``, ``enqueue``, ``db upgrade|prune``, ``monitor``, the operators'
``status``, ``tasks``, ``cancel`` and ``purge``, and ``heartbeat list|wait-idle|wait-pid|delete``,
which deploy tools run to read, await and remove heartbeat keys (one JSON object on stdout,
always; see ``heartbeat_cli.py``).

Exit codes: 0 done, 1 failed at run time, 2 bad usage or settings (one line on stderr naming the
option or variable; nothing is started), 3 ``status`` found a queue with jobs and no live worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from arq.jobs import Job, JobStatus

from . import heartbeat, heartbeat_cli, logs, operations
from .arguments import Parser, add_env_file, positive, seconds
from .fleet import parse_duration
from .infrastructure import create_engine, create_redis, initialize
from .registry import FlowImportError, registry
from .retention import prune
from .schema import STATUSES, SchemaError, upgrade
from .schema import check as check_schema
from .settings import Settings, SettingsError, env_name, load_settings
from .store import DATABASE_ERRORS
from .version import VERSION
from .worker import serve

# settings the worker takes as options, in the order --help lists them
WORKER_OPTIONS = (
    'queue_name',
    'max_jobs',
    'job_timeout',
    'log_level',
    'worker_id',
    'drain_timeout',
    'heartbeat_interval',
    'health_file',
    'poll_delay',
    'max_tries',
    'metrics_port',
    'metrics_port_offset',
    'metrics_address',
)
# settings the monitoring service takes as options
MONITOR_OPTIONS = {'monitor_host': '--host', 'monitor_port': '--port'}


class UsageError(Exception):
    pass


def _field_help(field: str) -> str:
    info = Settings.model_fields[field]
    default = info.default
    if isinstance(default, str) and field != 'worker_id':
        default = f"'{default}'"
    # argparse %-formats help: a literal % (systemd's %i) is written %%
    return f'{info.description} [env {env_name(field)}; default {default}]'.replace('%', '%%')


def worker_parser(prog: str | None = None) -> Parser:
    parser = Parser(
        prog=prog,
        description='Run one worker process: it runs flows from the queue arq:queue:<queue-name> and records '
        'every task in PostgreSQL. Settings come from the command line, then the environment, then the env '
        'file, then defaults. SIGTERM/SIGINT drain and stop; SIGUSR1 stops picking jobs.',
        argument_default=argparse.SUPPRESS,
    )
    for field in WORKER_OPTIONS:
        option = '--' + field.replace('_', '-')
        parser.add_argument(option, dest=field, metavar=field.split('_')[-1].upper(), help=_field_help(field))
    add_env_file(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog='flowworker', description='Run and operate flowworker: arq workers that run flows.')
    parser.add_argument('--version', action='version', version=f'flowworker {VERSION}')
    commands = parser.add_subparsers(dest='command', required=True, parser_class=Parser)

    commands.add_parser(
        'worker',
        parents=[worker_parser()],
        add_help=False,
        help='run one worker process',
        description=worker_parser().description,
    )

    enqueue = commands.add_parser('enqueue', help='queue a flow, as a producer would')
    enqueue.add_argument('flow', help='flow name, e.g. demo.echo')
    enqueue.add_argument('--params', default='{}', metavar='JSON', help="the flow's params as a JSON object")
    enqueue.add_argument(
        '--queue',
        dest='queue_name',
        default=argparse.SUPPRESS,
        metavar='NAME',
        help=_field_help('queue_name'),
    )
    enqueue.add_argument('--count', type=int, default=1, metavar='N', help='queue N jobs (default 1)')
    enqueue.add_argument(
        '--wait',
        type=float,
        metavar='SECONDS',
        help='wait up to SECONDS for the results and print them; exit 1 if any job failed',
    )
    add_env_file(enqueue)

    db = commands.add_parser('db', help='manage the task-record schema')
    db_commands = db.add_subparsers(dest='db_command', required=True, parser_class=Parser)
    db_upgrade = db_commands.add_parser(
        'upgrade', help='create or migrate the schema (run as its owner); idempotent'
    )
    db_upgrade.add_argument(
        '--grant-to', metavar='ROLE', help='grant this role the SELECT, INSERT and UPDATE a worker needs'
    )
    add_env_file(db_upgrade)
    db_prune = db_commands.add_parser(
        'prune',
        help='delete the records of jobs that ended more than AGE ago (run as the schema owner)',
        description='Delete the jobs, with all their attempts, whose latest attempt is final (succeeded, '
        'failed, cancelled) and finished more than AGE ago, in short batches that never wait on a worker; '
        'running, retrying, interrupted and lost jobs are kept. Prints what it removed.',
    )
    db_prune.add_argument(
        '--older-than',
        type=_age,
        required=True,
        metavar='AGE',
        help='finished more than AGE ago: 12h, 30d',
    )
    db_prune.add_argument(
        '--batch', type=positive, default=1000, metavar='N', help='at most N jobs per transaction (1000)'
    )
    db_prune.add_argument('--dry-run', action='store_true', help='delete nothing, say what would go')
    add_env_file(db_prune)

    _add_operations(commands)

    monitor = commands.add_parser(
        'monitor',
        help='serve the monitoring service (HTTP API, /workers page, /metrics, /healthz)',
        description='Serve the monitoring service; needs the monitor extra: pip install '
        '"flowworker[monitor]". It connects to Redis and PostgreSQL with the same settings as the worker.',
        argument_default=argparse.SUPPRESS,
    )
    for field, option in MONITOR_OPTIONS.items():
        monitor.add_argument(option, dest=field, metavar=option[2:].upper(), help=_field_help(field))
    add_env_file(monitor)
    return parser


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _age(value: str) -> float:
    """A duration above 0: a prune --older-than 0 would delete every finished job."""
    seconds = _duration(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f'{value!r} must be more than 0 (12h, 30d)')
    return seconds


def _add_operations(commands: Any) -> None:
    status = commands.add_parser(
        'status',
        help='the fleet: live workers, queue lengths, completion and failure rates',
        description='Show the live workers (from their heartbeats), the length of every queue (ZCARD) '
        'and the tasks that ended in the last 1, 5 and 15 minutes. Exit 3 when a queue has jobs and no '
        'live worker picks them, 1 when Redis or PostgreSQL does not answer.',
    )
    status.add_argument('--json', action='store_true', help='print JSON for scripts')
    add_env_file(status)

    tasks = commands.add_parser(
        'tasks', help='list task records, e.g. stuck ones: --status running --older-than 10m'
    )
    tasks.add_argument('--status', choices=STATUSES, help="the job's latest attempt has this status")
    tasks.add_argument('--flow', metavar='NAME', help='only this flow')
    tasks.add_argument(
        '--older-than', type=_duration, metavar='AGE', help='started more than AGE ago: 90s, 10m, 2h, 1d'
    )
    tasks.add_argument('--limit', type=positive, default=50, metavar='N', help='at most N, newest first (50)')
    tasks.add_argument('--json', action='store_true', help='print JSON for scripts')
    add_env_file(tasks)

    cancel = commands.add_parser(
        'cancel', help='cancel a queued or running job (arq abort); its record says cancelled'
    )
    cancel.add_argument('job_id', metavar='JOB_ID')
    cancel.add_argument(
        '--wait',
        type=seconds,
        default=10.0,
        metavar='SECONDS',
        help='wait up to SECONDS for a worker to cancel it (10); exit 1 if none did',
    )
    add_env_file(cancel)

    purge = commands.add_parser(
        'purge',
        help='remove the queued jobs of a queue, not the running ones (asks first)',
        description='Remove every job of arq:queue:NAME that is not running (queued, deferred, waiting to '
        'retry), with its job key; running jobs finish as usual. Asks for confirmation unless --yes.',
    )
    purge.add_argument('--queue', dest='queue_name', required=True, metavar='NAME', help='the queue')
    purge.add_argument('--yes', action='store_true', help='do not ask (for scripts)')
    add_env_file(purge)

    _add_heartbeat(commands)

    health = commands.add_parser(
        'health',
        help="this host's worker's health, for a container HEALTHCHECK (exit 0 healthy, 1 not)",
        description='Read FLOWWORKER_HEALTH_FILE, which the worker rewrites after each heartbeat, and say '
        'whether the process runs and its last beat, recent enough, reached Redis. Exit 0 when it did, '
        '1 when not (the reason on one line), 2 when FLOWWORKER_HEALTH_FILE is not set.',
    )
    health.add_argument(
        '--max-age',
        type=seconds,
        metavar='SECONDS',
        help='the last beat may be this old (default: three heartbeat intervals, the key TTL)',
    )
    add_env_file(health)


def _add_heartbeat(commands: Any) -> None:
    beats = commands.add_parser(
        'heartbeat',
        help='read, await or delete heartbeat keys arq:worker:<worker-id> (for deploy tools; JSON out)',
        description=heartbeat_cli.DESCRIPTION,
    )
    heartbeat_cli.add_actions(beats)


def _settings(
    args: argparse.Namespace, fields: Sequence[str], options: Mapping[str, str] | None = None
) -> Settings:
    overrides = {f: getattr(args, f) for f in fields if hasattr(args, f)}
    return load_settings(args.env_file, options=options, **overrides)


def run_worker(args: argparse.Namespace) -> int:
    settings = _settings(args, WORKER_OPTIONS)
    settings.require_database()
    settings.require_redis()
    logs.configure(settings.log_level, settings.log_format)
    registry.load(settings.flow_modules, settings.project_root)

    async def main() -> int:
        # pg_stat_activity names each worker's connections
        infra = await initialize(
            settings, connect_retries=30, application_name=f'flowworker worker {settings.worker_id}'
        )
        try:
            return await serve(infra, registry)
        finally:
            await infra.shutdown()

    return asyncio.run(main())


async def _enqueue(settings: Settings, args: argparse.Namespace) -> int:
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as e:
        raise UsageError(f'--params is not JSON: {e}') from None
    if not isinstance(params, dict):
        raise UsageError('--params must be a JSON object')
    if args.count < 1:
        raise UsageError('--count must be at least 1')
    redis = await create_redis(settings)
    try:
        jobs = [
            await redis.enqueue_job('run_flow', args.flow, params, _queue_name=settings.queue_key)
            for _ in range(args.count)
        ]
        queued = [job for job in jobs if job is not None]
        if args.wait is None:
            for job in queued:
                print(job.job_id)
            return 0
        return await _print_results(queued, args.wait)
    finally:
        await redis.aclose(close_connection_pool=True)


async def _print_results(jobs: list[Job], timeout: float) -> int:
    failed = 0
    for job in jobs:
        try:
            result: Any = await job.result(timeout=timeout, poll_delay=0.1)
            print(json.dumps({'job_id': job.job_id, 'status': 'succeeded', 'result': result}, default=repr))
        except TimeoutError:
            failed += 1
            status = await job.status()
            print(
                json.dumps(
                    {
                        'job_id': job.job_id,
                        'status': status.value if status != JobStatus.not_found else 'unknown',
                    }
                )
            )
        except Exception as e:  # the job's own error, re-raised by arq
            failed += 1
            print(json.dumps({'job_id': job.job_id, 'status': 'failed', 'error': f'{type(e).__name__}: {e}'}))
    return 1 if failed else 0


def run_enqueue(args: argparse.Namespace) -> int:
    settings = _settings(args, ('queue_name',))
    settings.require_redis()
    return asyncio.run(_enqueue(settings, args))


def run_db(args: argparse.Namespace) -> int:
    settings = _settings(args, ())
    settings.require_database()

    async def main() -> str:
        engine = create_engine(settings)
        try:
            if args.db_command == 'upgrade':
                applied = await upgrade(engine, grant_to=args.grant_to)
                if not applied:
                    return 'schema is up to date'
                return f'applied migrations {", ".join(map(str, applied))}'
            await check_schema(engine)
            return str(await prune(engine, args.older_than, args.batch, args.dry_run))
        except DATABASE_ERRORS as e:
            raise operations.Unreachable(operations.unreachable(e)) from None
        finally:
            await engine.dispose()

    print(asyncio.run(main()))
    return 0


def run_monitor(args: argparse.Namespace) -> int:
    settings = _settings(args, tuple(MONITOR_OPTIONS), MONITOR_OPTIONS)
    settings.require_database()
    settings.require_redis()
    try:
        from . import monitor  # noqa: PLC0415  # the web stack is an optional extra
    except ImportError as e:
        raise UsageError(
            f'flowworker monitor needs the monitor extra ({e.name} is not installed): '
            'pip install "flowworker[monitor]"'
        ) from None
    logs.configure(settings.log_level, settings.log_format)
    return monitor.serve(settings)


def run_health(args: argparse.Namespace) -> int:
    healthy, message = heartbeat.health(_settings(args, ()), args.max_age)
    print(message)
    return 0 if healthy else 1


def run_status(args: argparse.Namespace) -> int:
    return operations.status(_settings(args, ()), args.json)


def run_tasks(args: argparse.Namespace) -> int:
    return operations.tasks(
        _settings(args, ()),
        status=args.status,
        flow=args.flow,
        older_than=args.older_than,
        limit=args.limit,
        as_json=args.json,
    )


def run_cancel(args: argparse.Namespace) -> int:
    return operations.cancel(_settings(args, ()), args.job_id, args.wait)


def run_purge(args: argparse.Namespace) -> int:
    return operations.purge(_settings(args, ('queue_name',), {'queue_name': '--queue'}), args.yes)


def _run(command: Any, args: argparse.Namespace, prog: str) -> int:
    try:
        return int(command(args))
    except (SettingsError, UsageError, FlowImportError, SchemaError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    except operations.Unreachable as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1


def start_worker(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``scripts/start_worker.py``: the worker with the guide's options."""
    parser = worker_parser(prog)
    args = parser.parse_args(argv)
    args.env_file = getattr(args, 'env_file', None)
    return _run(run_worker, args, parser.prog)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.env_file = getattr(args, 'env_file', None)
    command = {
        'worker': run_worker,
        'enqueue': run_enqueue,
        'db': run_db,
        'monitor': run_monitor,
        'status': run_status,
        'tasks': run_tasks,
        'cancel': run_cancel,
        'purge': run_purge,
        'heartbeat': heartbeat_cli.run,
        'health': run_health,
    }[args.command]
    return _run(command, args, 'flowworker')
