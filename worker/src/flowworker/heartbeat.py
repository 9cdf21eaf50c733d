"""Per-process heartbeat: the key ``arq:worker:<worker-id>`` exists exactly while the process lives.

The value is JSON (host, pid, queue, max_jobs, state, job counts, start and beat times); the key
expires after three intervals, so a killed process drops out on its own, and a process that
stops cleanly deletes it. ``KEYS arq:worker:*`` (better: ``SCAN``) lists the live fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from redis.asyncio import Redis

from .infrastructure import REDIS_ERRORS, describe_error
from .settings import Settings
from .version import VERSION

logger = logging.getLogger('flowworker.heartbeat')

KEY_PREFIX = 'arq:worker:'
TTL_INTERVALS = 3


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
            try:
                await self.beat()
            except REDIS_ERRORS as e:
                logger.warning('cannot write heartbeat %s: %s', self._key, describe_error(e))
            self._now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), self._settings.heartbeat_interval)

    async def clear(self) -> None:
        try:
            await self._redis.delete(self._key)
        except REDIS_ERRORS as e:
            logger.warning(
                'cannot delete heartbeat %s, it expires in %ds: %s', self._key, self._ttl, describe_error(e)
            )
