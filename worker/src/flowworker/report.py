"""The fleet and task records as text tables for a terminal (``flowworker status`` and ``tasks``).

The rows come from :mod:`.fleet` (the monitor's ``/workers`` page shows the same columns, from
:func:`worker_rows` and friends); this module only lays them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .fleet import Fleet, Queue, Rate, Task, Worker

WORKER_COLUMNS = ('worker', 'host', 'queue', 'state', 'running', 'completed', 'failed', 'heartbeat')
QUEUE_COLUMNS = ('queue', 'length', 'ready', 'oldest ready', 'deferred', 'running', 'workers')
RATE_COLUMNS = ('window', 'succeeded', 'failed', 'cancelled', 'completion rate', 'failure rate')
TASK_COLUMNS = ('job id', 'flow', 'status', 'attempt', 'worker', 'started', 'runtime', 'error')
ERROR_WIDTH = 60


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


def task_row(task: Task) -> tuple[str, ...]:
    error = (task.error or '').splitlines()[0] if task.error else ''
    if len(error) > ERROR_WIDTH:
        error = error[: ERROR_WIDTH - 1] + '…'
    return (
        task.job_id,
        task.flow,
        task.status,
        str(task.attempt),
        task.worker_id,
        task.started_at.strftime('%Y-%m-%d %H:%M:%S'),
        age(task.runtime),
        error,
    )


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    header = [c.upper() for c in columns]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return '\n'.join(
        '  '.join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    )


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


def status(fleet: Fleet) -> str:
    tables = [table(s.columns, s.rows) if s.rows else s.empty for s in sections(fleet)]
    return '\n\n'.join([*tables, *stranded_lines(fleet)])


def tasks(found: list[Task]) -> str:
    return table(TASK_COLUMNS, [task_row(t) for t in found]) if found else 'no tasks'
