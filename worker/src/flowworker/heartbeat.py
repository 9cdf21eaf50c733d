"""Per-process heartbeat: the key ``arq:worker:<worker-id>`` exists exactly while the process lives.

The value is JSON (host, pid, queue, max_jobs, state, job counts, start and beat times); the key
expires after three intervals, so a killed process drops out on its own, and a process that
stops cleanly deletes it. ``SCAN arq:worker:*`` (never ``KEYS``) lists the live fleet.

:class:`Heartbeat` writes a process's own key and, with ``FLOWWORKER_HEALTH_FILE``, how its last
beat went to that file, which ``flowworker health`` reads (:func:`health`): a container's
HEALTHCHECK asks the process itself, through no port. The readers below are the one place anything else
reads the keys: ``fleet.py`` (``flowworker status``, the monitoring service) and ``flowworker
heartbeat`` (``list``, ``wait-idle``, ``wait-pid``, ``delete``), which the Ansible role runs to
drain, restart and scale instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from redis.asyncio import Redis

from .infrastructure import REDIS_ERRORS, REDIS_REFUSALS, describe_error
from .settings import Settings, SettingsError
from .version import VERSION

logger = logging.getLogger('flowworker.heartbeat')

KEY_PREFIX = 'arq:worker:'
TTL_INTERVALS = 3
SCAN_COUNT = 500
# seconds between reads while waiting for workers to go idle, or for a new process's first beat
IDLE_POLL = 0.5
PID_POLL = 0.25

Payload = dict[str, Any]


def heartbeat_key(worker_id: str) -> str:
    return KEY_PREFIX + worker_id


@dataclass
class JobCounts:
    running: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0


class Heartbeat:
    def __init__(
        self, redis: Redis, settings: Settings, jobs: JobCounts, database_ok: Callable[[], bool]
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._jobs = jobs
        self._database_ok = database_ok
        self._key = heartbeat_key(settings.worker_id)
        self._ttl = math.ceil(TTL_INTERVALS * settings.heartbeat_interval)
        self._started_at = datetime.now(UTC).isoformat()
        self._now = asyncio.Event()
        self.state: Literal['running', 'draining'] = 'running'

    def payload(self) -> dict[str, Any]:
        return {
            'worker_id': self._settings.worker_id,
            'host': socket.gethostname(),
            'pid': os.getpid(),
            'queue': self._settings.queue_name,
            'max_jobs': self._settings.max_jobs,
            'state': self.state,
            'database': 'ok' if self._database_ok() else 'unreachable',
            'jobs': asdict(self._jobs),
            'version': VERSION,
            'started_at': self._started_at,
            'beat_at': datetime.now(UTC).isoformat(),
        }

    async def beat(self) -> None:
        await self._redis.set(self._key, json.dumps(self.payload()), ex=self._ttl)
        logger.debug('heartbeat %s', self._key, extra={'state': self.state, **asdict(self._jobs)})

    def drain(self) -> None:
        """Report ``draining`` now: the process picks no more jobs."""
        self.state = 'draining'
        self._now.set()

    async def run(self) -> None:
        """Beat every interval (and at once on a state change) until cancelled."""
        while True:
            redis = 'ok'
            try:
                await self.beat()
            except (*REDIS_ERRORS, *REDIS_REFUSALS) as e:
                redis = describe_error(e)
                logger.warning('cannot write heartbeat %s: %s', self._key, redis)
            self.record(redis)
            self._now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), self._settings.heartbeat_interval)

    def record(self, redis: str) -> None:
        """How the last beat went, in FLOWWORKER_HEALTH_FILE (a new file moved over the old one)."""
        path = self._settings.health_file
        if path is None:
            return
        state = {
            'worker_id': self._settings.worker_id,
            'pid': os.getpid(),
            'state': self.state,
            'redis': redis,
            'beat_at': time.time(),
            'interval': self._settings.heartbeat_interval,
        }
        written = path.with_name(f'.{path.name}.{os.getpid()}')
        try:
            written.write_text(json.dumps(state))
            os.replace(written, path)
        except OSError as e:
            logger.warning('cannot write the health file %s: %s', path, e)

    async def clear(self) -> None:
        if self._settings.health_file is not None:
            self._settings.health_file.unlink(missing_ok=True)
        try:
            await self._redis.delete(self._key)
        except REDIS_ERRORS as e:
            logger.warning(
                'cannot delete heartbeat %s, it expires in %ds: %s', self._key, self._ttl, describe_error(e)
            )


def health(settings: Settings, max_age: float | None = None) -> tuple[bool, str]:
    """``flowworker health``: what FLOWWORKER_HEALTH_FILE says of its process. Healthy while the
    process runs and its last beat, at most ``max_age`` seconds ago (by default the heartbeat
    key's TTL, three intervals), reached Redis."""
    path = settings.health_file
    if path is None:
        raise SettingsError('FLOWWORKER_HEALTH_FILE is not set: no worker writes a health file to read')
    try:
        state = json.loads(path.read_text())
        who = f'worker {state["worker_id"]} (pid {state["pid"]})'
        age = time.time() - float(state['beat_at'])
        limit = max_age if max_age is not None else TTL_INTERVALS * float(state['interval'])
        pid, redis, state_name = int(state['pid']), str(state['redis']), str(state['state'])
    except FileNotFoundError:
        return False, f'no health file {path}: the worker has not beaten yet, or has stopped'
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f'cannot read the health file {path}: {describe_error(e)}'
    if not _alive(pid):
        return False, f'{who} is gone'
    if age > limit:
        return False, f'{who} last beat {age:.1f}s ago, more than {limit:g}s'
    if redis != 'ok':
        return False, f'{who} cannot reach Redis: {redis}'
    return True, f'{who} {state_name}, last beat {age:.1f}s ago'


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


# --- reading the fleet's heartbeats ---------------------------------------------------------


def decode(raw: bytes) -> Payload:
    """A heartbeat's JSON object; a value that is not one as ``{'raw': <the value>}``."""
    text = raw.decode('utf-8', 'replace')
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    return payload if isinstance(payload, dict) else {'raw': text}


async def beats(redis: Redis, match: str = '*') -> dict[str, bytes]:
    """The raw heartbeats of the worker ids that match the glob ``match``, by worker id (SCAN + MGET)."""
    keys = sorted({key async for key in redis.scan_iter(match=heartbeat_key(match), count=SCAN_COUNT)})
    if not keys:
        return {}
    values = await redis.mget(keys)
    return {
        key.decode('utf-8', 'replace').removeprefix(KEY_PREFIX): raw
        for key, raw in zip(keys, values, strict=True)
        if raw is not None  # the process stopped between SCAN and MGET
    }


async def read(redis: Redis, worker_ids: Sequence[str]) -> dict[str, Payload | None]:
    """The heartbeats of ``worker_ids``; ``None`` where there is none (or the key holds no string)."""
    if not worker_ids:
        return {}
    values = await redis.mget([heartbeat_key(worker_id) for worker_id in worker_ids])
    return {
        worker_id: None if raw is None else decode(raw)
        for worker_id, raw in zip(worker_ids, values, strict=True)
    }


def running_jobs(payload: Payload) -> int:
    jobs = payload.get('jobs')
    running = jobs.get('running', 0) if isinstance(jobs, dict) else 0
    return running if isinstance(running, int) else 0


def idle(payload: Payload | None) -> bool:
    """Gone, or no longer ``running`` (the process picks no more jobs) with no job left running."""
    return payload is None or (payload.get('state') != 'running' and running_jobs(payload) == 0)


def reports_pid(payload: Payload | None, pid: int) -> bool:
    """The process ``pid`` beats and picks jobs."""
    return payload is not None and payload.get('pid') == pid and payload.get('state') == 'running'


@dataclass
class Waited:
    workers: dict[str, Payload | None]  # the last heartbeat read of each, None: no key
    pending: list[str]  # not in the awaited state when the time was up
    elapsed: float  # seconds, rounded to 0.01


async def _poll(
    redis: Redis,
    worker_ids: Sequence[str],
    done: Callable[[Payload | None], bool],
    timeout: float,
    interval: float,
) -> Waited:
    """Read the pending heartbeats every ``interval`` until each is ``done`` or ``timeout`` is up."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    seen: dict[str, Payload | None] = dict.fromkeys(worker_ids)
    pending = list(seen)
    while True:
        found = await read(redis, pending)
        seen.update(found)
        pending = [worker_id for worker_id in pending if not done(found[worker_id])]
        remaining = started + timeout - loop.time()
        if not pending or remaining <= 0:
            return Waited(seen, pending, round(loop.time() - started, 2))
        await asyncio.sleep(min(interval, remaining))  # the last read falls on the deadline


async def wait_idle(
    redis: Redis, worker_ids: Sequence[str], timeout: float, interval: float = IDLE_POLL
) -> Waited:
    """Wait until every one of ``worker_ids`` is :func:`idle`; ``pending``: those that were not."""
    return await _poll(redis, worker_ids, idle, timeout, interval)


async def wait_pid(
    redis: Redis, worker_id: str, pid: int, timeout: float, interval: float = PID_POLL
) -> Waited:
    """Wait until ``worker_id``'s heartbeat comes from process ``pid`` in state ``running``."""
    return await _poll(redis, [worker_id], lambda payload: reports_pid(payload, pid), timeout, interval)


def no_heartbeat(worker_id: str, pid: int, timeout: float, last: Payload | None) -> str:
    """Why :func:`wait_pid` timed out, naming what the key last said."""
    seen = 'none' if last is None else f'pid {last.get("pid")} in state {last.get("state")}'
    return f'no heartbeat from {worker_id} with pid {pid} within {timeout:g} s (last heartbeat: {seen})'


async def delete(redis: Redis, worker_ids: Sequence[str], dry_run: bool = False) -> list[str]:
    """The worker ids whose heartbeat key existed; their keys deleted unless ``dry_run``."""
    unique = list(dict.fromkeys(worker_ids))
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in unique:
            if dry_run:
                pipe.exists(heartbeat_key(worker_id))
            else:
                pipe.delete(heartbeat_key(worker_id))
        counts = await pipe.execute()
    return [worker_id for worker_id, count in zip(unique, counts, strict=True) if count]
