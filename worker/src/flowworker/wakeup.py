"""Wake an idle worker the moment a job is queued, instead of polling on a short timer.

arq polls its queue every ``poll_delay``: a short delay burns CPU while idle, a long one delays
every job. Producers add a job with ``ZADD arq:queue:<name>``; when Redis publishes keyspace
events for sorted sets (``notify-keyspace-events`` holding ``K`` and ``z`` or ``A``), an idle
worker waits on that event and starts the job within a round trip, with no polling at all. A
plain arq producer needs no change.

Whether Redis publishes them is found out without ``CONFIG`` (which a worker's ACL user may not
run, see ``acl.py``): at start-up the worker subscribes to the events of a probe key of its own
(``flowworker:wakeup-probe:<worker id>``), writes it, and waits up to a second for the event.
Where none comes (events off, or the user may not subscribe), the worker falls back to polling
every ``FLOWWORKER_POLL_DELAY`` seconds and says so at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .acl import WAKEUP_PROBE_PREFIX
from .infrastructure import REDIS_ERRORS, backoff, describe_error

logger = logging.getLogger('flowworker.wakeup')

# events that put a job in the queue: enqueue, and arq's re-queue of a retried job
QUEUE_EVENTS = {b'zadd', b'zincr'}
# how long the start-up probe waits for its own event (a round trip on a sound network)
PROBE_TIMEOUT = 1.0


class QueueWakeup:
    def __init__(self, redis: Redis, queue_key: str, database: int, worker_id: str) -> None:
        self._redis = redis
        self._channel = f'__keyspace@{database}__:{queue_key}'
        self._probe_key = WAKEUP_PROBE_PREFIX + worker_id
        self._probe_channel = f'__keyspace@{database}__:{self._probe_key}'
        self._task: asyncio.Task[None] | None = None
        self.event = asyncio.Event()

    @property
    def listening(self) -> bool:
        return self._task is not None

    async def start(self) -> bool:
        """Subscribe to the queue's keyspace events if Redis publishes them; True if it does."""
        try:
            heard = await self._probe()
        except (*REDIS_ERRORS, ResponseError) as e:
            logger.info('cannot probe for keyspace events (%s): polling the queue', describe_error(e))
            return False
        if not heard:
            logger.info(
                'Redis published no keyspace event for a sorted set within %.0fs: polling the queue; '
                "set notify-keyspace-events to 'Kz' to wake workers without polling",
                PROBE_TIMEOUT,
            )
            return False
        self._task = asyncio.create_task(self._listen(), name='flowworker-wakeup')
        return True

    async def _probe(self) -> bool:
        """Write the probe key while subscribed to its events; True once its event arrives."""
        loop = asyncio.get_running_loop()
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self._probe_channel)
            try:
                await self._redis.zadd(self._probe_key, {'probe': 0})
                deadline = loop.time() + PROBE_TIMEOUT
                while (left := deadline - loop.time()) > 0:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                    if message is not None and message['data'] == b'zadd':
                        return True
                return False
            finally:
                await self._redis.delete(self._probe_key)

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
