"""Wake an idle worker the moment a job is queued, instead of polling on a short timer.

arq polls its queue every ``poll_delay``: a short delay burns CPU while idle, a long one delays
every job. Producers add a job with ``ZADD arq:queue:<name>``; when Redis publishes keyspace
events for sorted sets (``notify-keyspace-events`` holding ``K`` and ``z`` or ``A``), an idle
worker waits on that event and starts the job within a round trip, with no polling at all. A
plain arq producer needs no change. Where the events are off (or ``CONFIG`` is not allowed), the
worker falls back to polling every ``FLOWWORKER_POLL_DELAY`` seconds and says so at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .infrastructure import REDIS_ERRORS, backoff, describe_error

logger = logging.getLogger('flowworker.wakeup')

# events that put a job in the queue: enqueue, and arq's re-queue of a retried job
QUEUE_EVENTS = {b'zadd', b'zincr'}


def events_enabled(flags: str) -> bool:
    return 'K' in flags and ('z' in flags or 'A' in flags)


class QueueWakeup:
    def __init__(self, redis: Redis, queue_key: str, database: int) -> None:
        self._redis = redis
        self._channel = f'__keyspace@{database}__:{queue_key}'
        self._task: asyncio.Task[None] | None = None
        self.event = asyncio.Event()

    @property
    def listening(self) -> bool:
        return self._task is not None

    async def start(self) -> bool:
        """Subscribe to the queue's keyspace events if Redis publishes them; True if it does."""
        try:
            flags = (await self._redis.config_get('notify-keyspace-events')).get('notify-keyspace-events', '')
        except ResponseError as e:
            logger.info('cannot read notify-keyspace-events (%s): polling the queue', e)
            return False
        if not events_enabled(flags):
            logger.info(
                'Redis publishes no keyspace events for sorted sets (notify-keyspace-events=%r): '
                "polling the queue; set it to 'Kz' to wake workers without polling",
                flags,
            )
            return False
        self._task = asyncio.create_task(self._listen(), name='flowworker-wakeup')
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self) -> None:
        delays = backoff()
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    delays = backoff()
                    # anything may have been queued while we were not subscribed
                    self.event.set()
                    async for message in pubsub.listen():
                        if message['type'] == 'message' and message['data'] in QUEUE_EVENTS:
                            self.event.set()
            except REDIS_ERRORS as e:
                delay = next(delays)
                logger.warning('lost the queue subscription, retrying in %.1fs: %s', delay, describe_error(e))
                await asyncio.sleep(delay)
