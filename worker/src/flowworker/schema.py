"""The task-record schema and its migrations (``flowworker db upgrade``).

One row per attempt in ``flow_task_attempts``; the view ``flow_tasks`` shows each job's latest
attempt, i.e. one row per job. Migrations are explicit SQL, applied in order under an advisory
lock by the schema owner; the worker itself only needs SELECT, INSERT and UPDATE.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

logger = logging.getLogger('flowworker.schema')

Status = Literal['running', 'succeeded', 'failed', 'retrying', 'interrupted', 'cancelled', 'lost']
STATUSES: tuple[str, ...] = get_args(Status)
FINAL_STATUSES = ('succeeded', 'failed', 'cancelled')

# (version, statements); append only: a released migration is never edited
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            f"""CREATE TABLE flow_task_attempts (
                job_id text NOT NULL,
                attempt integer NOT NULL CHECK (attempt >= 1),
                flow text NOT NULL,
                queue text NOT NULL,
                status text NOT NULL CHECK (status IN ({', '.join(f"'{s}'" for s in STATUSES)})),
                worker_id text NOT NULL,
                enqueued_at timestamptz,
                started_at timestamptz NOT NULL,
                finished_at timestamptz,
                error text,
                result jsonb,
                PRIMARY KEY (job_id, attempt)
            )""",
            'CREATE INDEX flow_task_attempts_running ON flow_task_attempts (worker_id) '
            "WHERE status = 'running'",
            'CREATE INDEX flow_task_attempts_finished_at ON flow_task_attempts (finished_at)',
            """CREATE VIEW flow_tasks AS
                SELECT DISTINCT ON (job_id) job_id, attempt, flow, queue, status, worker_id,
                       enqueued_at, started_at, finished_at, error, result
                FROM flow_task_attempts ORDER BY job_id, attempt DESC""",
        ),
    ),
    # `flowworker tasks` and the API list the newest first: without it each list sorts the table
    (2, ('CREATE INDEX flow_task_attempts_started_at ON flow_task_attempts (started_at)',)),
    # the monitor's latest failures: without it a fleet that seldom fails walks the whole
    # finished_at index for them; it holds the failed attempts only
    (
        3,
        (
            'CREATE INDEX flow_task_attempts_failed ON flow_task_attempts (finished_at) '
            "WHERE status = 'failed'",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
_LOCK_ID = 0x666C6F77  # pg_advisory_xact_lock key: 'flow'


class SchemaError(RuntimeError):
    pass


async def _current_version(conn: AsyncConnection) -> int:
    exists = await conn.scalar(text("SELECT to_regclass('flowworker_schema') IS NOT NULL"))
    if not exists:
        return 0
    return int(await conn.scalar(text('SELECT coalesce(max(version), 0) FROM flowworker_schema')) or 0)


async def upgrade(engine: AsyncEngine, grant_to: str | None = None) -> list[int]:
    """Apply the migrations the database lacks; return their versions (empty when up to date)."""
    async with engine.begin() as conn:
        await conn.execute(text('SELECT pg_advisory_xact_lock(:id)'), {'id': _LOCK_ID})
        await conn.execute(
            text(
                'CREATE TABLE IF NOT EXISTS flowworker_schema '
                '(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())'
            )
        )
        current = await _current_version(conn)
        applied = []
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                await conn.execute(text(statement))
            await conn.execute(text('INSERT INTO flowworker_schema (version) VALUES (:v)'), {'v': version})
            applied.append(version)
            logger.info('applied schema migration %d', version)
        if grant_to:
            role = conn.dialect.identifier_preparer.quote(grant_to)
            await conn.execute(text(f'GRANT SELECT, INSERT, UPDATE ON flow_task_attempts TO {role}'))
            await conn.execute(text(f'GRANT SELECT ON flow_tasks, flowworker_schema TO {role}'))
        return applied


async def check(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaError` unless the database has the schema this worker writes."""
    async with engine.connect() as conn:
        try:
            current = await _current_version(conn)
        except ProgrammingError as e:
            raise SchemaError(f'cannot read the task-record schema: {e.orig}') from None
    if current < SCHEMA_VERSION:
        raise SchemaError(
            f'the database schema is at version {current}, this worker needs {SCHEMA_VERSION}: '
            'run `flowworker db upgrade` as the schema owner'
        )
