"""Retention of the task records (``flowworker db prune``): old finished jobs go, a short batch at a time.

A job goes, with all its attempts, once its latest attempt is final (succeeded, failed, cancelled)
and finished before the cutoff; a running, retrying, interrupted or lost job is never touched.
Each batch is one short transaction of at most ``batch`` jobs, found oldest first through the
``finished_at`` index; rows another transaction holds are skipped (SKIP LOCKED), so a prune never
waits on a worker and holds no lock past its batch. The schema owner runs it: the worker role has
no DELETE right.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from .schema import FINAL_STATUSES, SchemaError

# jobs whose latest attempt is final and finished before the cutoff
PRUNABLE = """
SELECT a.job_id, a.status, a.finished_at FROM flow_task_attempts AS a
WHERE a.finished_at < :cutoff AND a.status = ANY(CAST(:final AS text[]))
  AND NOT EXISTS (SELECT 1 FROM flow_task_attempts AS n WHERE n.job_id = a.job_id AND n.attempt > a.attempt)
"""
# (status of the latest attempt, jobs, attempts) deleted; the query is made of constants only
PRUNE_BATCH = text(f"""
WITH doomed AS ({PRUNABLE} ORDER BY a.finished_at LIMIT :batch FOR UPDATE OF a SKIP LOCKED),
gone AS (DELETE FROM flow_task_attempts AS t USING doomed WHERE t.job_id = doomed.job_id RETURNING t.job_id)
SELECT doomed.status, count(DISTINCT job_id), count(*)
FROM gone JOIN doomed USING (job_id) GROUP BY doomed.status
""")  # noqa: S608
COUNT = text(f"""
SELECT doomed.status, count(DISTINCT job_id), count(*)
FROM ({PRUNABLE}) AS doomed JOIN flow_task_attempts AS t USING (job_id) GROUP BY doomed.status
""")  # noqa: S608
INSUFFICIENT_PRIVILEGE = '42501'


@dataclass
class Pruned:
    cutoff: datetime
    dry_run: bool
    jobs: Counter[str] = field(default_factory=Counter)  # by the status of their latest attempt
    attempts: int = 0
    batches: int = 0

    def __str__(self) -> str:
        verb = 'would prune' if self.dry_run else 'pruned'
        counts = [f'{status} {self.jobs[status]}' for status in FINAL_STATUSES if self.jobs[status]]
        batches = '' if self.dry_run else f' in {self.batches} batches'
        return (
            f'{verb} {self.jobs.total()} jobs ({self.attempts} attempts) finished before '
            f'{self.cutoff.isoformat(timespec="seconds")}{batches}'
            + (f': {", ".join(counts)}' if counts else '')
        )


async def prune(engine: AsyncEngine, older_than: float, batch: int, dry_run: bool = False) -> Pruned:
    """Delete (or with ``dry_run`` count) the jobs that ended more than ``older_than`` seconds ago."""
    params = {'final': list(FINAL_STATUSES), 'batch': batch}
    async with engine.connect() as conn:
        cutoff = await conn.scalar(text('SELECT now() - make_interval(secs => :s)'), {'s': older_than})
    pruned = Pruned(cutoff=cutoff, dry_run=dry_run)
    params['cutoff'] = cutoff
    try:
        if dry_run:
            async with engine.connect() as conn:
                _count(pruned, (await conn.execute(COUNT, params)).tuples())
            return pruned
        while True:
            async with engine.begin() as conn:
                found = _count(pruned, (await conn.execute(PRUNE_BATCH, params)).tuples())
            if not found:
                return pruned
            pruned.batches += 1
    except DBAPIError as e:
        if getattr(e.orig, 'sqlstate', None) == INSUFFICIENT_PRIVILEGE:
            raise SchemaError(
                'this role may not delete task records: run `flowworker db prune` as the schema owner '
                '(DATABASE_URL of the role that ran `flowworker db upgrade`)'
            ) from None
        raise


def _count(pruned: Pruned, rows: Iterable[tuple[Any, ...]]) -> int:
    """Add one statement's (status, jobs, attempts) rows to ``pruned``; the jobs they had."""
    total = 0
    for status, jobs, attempts in rows:
        pruned.jobs[status] += jobs
        pruned.attempts += attempts
        total += jobs
    return total
