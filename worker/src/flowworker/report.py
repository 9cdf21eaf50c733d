"""The fleet and task records as text tables for a terminal (``flowworker status`` and ``tasks``).

The rows come from :mod:`.fleet` (the monitor's ``/workers`` page shows the same columns, from
:func:`worker_rows` and friends; its recent failures and task pages those of
:func:`failures_section` and :func:`attempts_section`); this module only lays them out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from .fleet import Fleet, Queue, Rate, Task, Worker

WORKER_COLUMNS = ('worker', 'host', 'queue', 'state', 'running', 'completed', 'failed', 'heartbeat')
QUEUE_COLUMNS = ('queue', 'length', 'ready', 'oldest ready', 'deferred', 'running', 'workers')
RATE_COLUMNS = ('window', 'succeeded', 'failed', 'cancelled', 'completion rate', 'failure rate')
TASK_COLUMNS = ('job id', 'flow', 'status', 'attempt', 'worker', 'started', 'runtime', 'error')
FAILURE_COLUMNS = ('job id', 'flow', 'error', 'worker', 'failed at')
ATTEMPT_COLUMNS = (
    'attempt',
    'status',
    'worker',
    'enqueued',
    'started',
    'finished',
    'duration',
    'error',
    'result',
)
# the columns of task data, which MONITOR_SHOW_TASK_DATA=false leaves out
DATA_COLUMNS = ('error', 'result')
ERROR_WIDTH = 60
# characters of a result the task page shows (the API has it whole)
RESULT_WIDTH = 2000
TIME_FORMAT = '%Y-%m-%d %H:%M:%S'


def age(seconds: float) -> str:
    if seconds < 60:
        return f'{seconds:.1f}s'
    if seconds < 3600:
        return f'{seconds / 60:.1f}m'
    return f'{seconds / 3600:.1f}h'


def worker_row(worker: Worker) -> tuple[str, ...]:
    return (
        worker.worker_id,
        worker.host,
        worker.queue,
        worker.state,
        f'{worker.running}/{worker.max_jobs}',
        str(worker.completed),
        str(worker.failed),
        f'{age(worker.heartbeat_age)} ago',
    )


def queue_row(queue: Queue) -> tuple[str, ...]:
    workers = f'{queue.workers}' if queue.picking == queue.workers else f'{queue.picking} of {queue.workers}'
    oldest = '-' if queue.oldest_ready_age is None else age(queue.oldest_ready_age)
    return (
        queue.name,
        str(queue.length),
        str(queue.ready),
        oldest,
        str(queue.deferred),
        str(queue.running),
        workers,
    )


def rate_row(rate: Rate) -> tuple[str, ...]:
    failure = '-' if rate.failure_rate is None else f'{100 * rate.failure_rate:.1f}%'
    return (
        rate.window,
        str(rate.succeeded),
        str(rate.failed),
        str(rate.cancelled),
        f'{rate.completion_rate:.3g}/s',
        failure,
    )


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + '…'


def error_line(error: str | None) -> str:
    """The first line of ``error``, at most :data:`ERROR_WIDTH` characters."""
    return shorten(error.splitlines()[0], ERROR_WIDTH) if error else ''


def when(at: datetime | None) -> str:
    return '-' if at is None else at.strftime(TIME_FORMAT)


def task_row(task: Task) -> tuple[str, ...]:
    return (
        task.job_id,
        task.flow,
        task.status,
        str(task.attempt),
        task.worker_id,
        when(task.started_at),
        age(task.runtime),
        error_line(task.error),
    )


def failure_row(task: Task) -> tuple[str, ...]:
    return (task.job_id, task.flow, error_line(task.error), task.worker_id, when(task.finished_at))


def attempt_row(task: Task) -> tuple[str, ...]:
    result = '' if task.result is None else shorten(json.dumps(task.result, ensure_ascii=False), RESULT_WIDTH)
    return (
        str(task.attempt),
        task.status,
        task.worker_id,
        when(task.enqueued_at),
        when(task.started_at),
        when(task.finished_at),
        age(task.runtime) if task.finished_at else f'{age(task.runtime)} so far',
        task.error or '',
        result,
    )


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    header = [c.upper() for c in columns]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return '\n'.join(
        '  '.join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    )


def redis_line(fleet: Fleet) -> str:
    node = fleet.redis
    return f'Redis {node.address}' + (', the master the sentinels name' if node.sentinels else '')


def stranded_lines(fleet: Fleet) -> list[str]:
    return [
        f'queue {queue.name}: {queue.length} jobs and no live worker picking them' for queue in fleet.stranded
    ]


@dataclass(frozen=True)
class Section:
    """One table of the fleet view: the terminal and the /workers page show the same ones."""

    id: str
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    empty: str
    # on a web page, where each row's first cell links to (empty: nowhere)
    links: tuple[str, ...] = ()


def sections(fleet: Fleet) -> list[Section]:
    return [
        Section(
            'workers',
            f'Workers ({len(fleet.workers)})',
            WORKER_COLUMNS,
            [worker_row(w) for w in fleet.workers],
            'no live workers',
        ),
        Section('queues', 'Queues', QUEUE_COLUMNS, [queue_row(q) for q in fleet.queues], 'no queues'),
        Section('rates', 'Tasks ended', RATE_COLUMNS, [rate_row(r) for r in fleet.rates], 'no tasks'),
    ]


def _without_data(
    columns: tuple[str, ...], rows: list[tuple[str, ...]], show_data: bool
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """``columns`` and ``rows`` less the :data:`DATA_COLUMNS` unless ``show_data``."""
    if show_data:
        return columns, rows
    keep = [i for i, column in enumerate(columns) if column not in DATA_COLUMNS]
    return tuple(columns[i] for i in keep), [tuple(row[i] for i in keep) for row in rows]


def failures_section(found: list[Task], show_data: bool, links: tuple[str, ...] = ()) -> Section:
    columns, rows = _without_data(FAILURE_COLUMNS, [failure_row(t) for t in found], show_data)
    return Section('failures', 'Recent failures', columns, rows, 'no failed tasks', links)


def attempts_section(found: list[Task], show_data: bool) -> Section:
    columns, rows = _without_data(ATTEMPT_COLUMNS, [attempt_row(t) for t in found], show_data)
    return Section('attempts', f'Attempts ({len(found)})', columns, rows, 'no attempt recorded yet')


def status(fleet: Fleet) -> str:
    tables = [table(s.columns, s.rows) if s.rows else s.empty for s in sections(fleet)]
    return '\n\n'.join([*tables, redis_line(fleet), *stranded_lines(fleet)])


def tasks(found: list[Task]) -> str:
    return table(TASK_COLUMNS, [task_row(t) for t in found]) if found else 'no tasks'
