"""The peers `make bench` times flowworker against: each library's job, producer and worker.

Runs with build/bench-venv's python (bench/peers.txt; none of these libraries is a dependency of
the worker): `python -m bench.peers fill celery_threads 10000` queues that many jobs with the
library's own producer API, `python -m bench.peers work celery_threads` runs its worker in this
one process until SIGTERM. Every job, bare arq's and flowworker's included, makes one Redis INCR
of COUNTER through a redis-py client of its process; the bench reads COUNTER to see them done.
Only ``redis`` is imported here up front, so each worker process loads its own library alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Callable
from functools import cache
from typing import Any

import redis
import redis.asyncio

COUNTER = 'bench:done'
QUEUE = 'default'
# jobs sent per gather (SAQ) or per pipeline (RQ's enqueue_many)
BATCH = 500
# what the bench prints of each peer's settings; {concurrency} is its --max-jobs
PEERS = {
    'saq': 'SAQ, concurrency {concurrency}',
    'dramatiq': 'Dramatiq, Redis broker, 1 process, {concurrency} threads',
    'celery_threads': 'Celery, Redis broker and results, threads pool of {concurrency}',
    'celery_solo': 'Celery, Redis broker and results, solo pool',
    'rq': 'RQ, SimpleWorker (one job at a time)',
}


@cache
def client() -> redis.Redis:
    return redis.Redis.from_url(os.environ['REDIS_URL'])


@cache
def async_client() -> redis.asyncio.Redis:
    return redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool.from_url(os.environ['REDIS_URL']))


def incr(*_: object) -> None:
    """The job of the peers that run jobs in threads or one at a time."""
    client().incr(COUNTER)


async def incr_async(*_: object) -> None:
    """The job of the asyncio workers: SAQ, bare arq (bench.bare) and flowworker (bench.flows)."""
    await async_client().incr(COUNTER)


def saq_queue() -> Any:
    from saq import Queue

    return Queue.from_url(os.environ['REDIS_URL'], name=QUEUE)


async def fill_saq(jobs: int) -> None:
    queue = saq_queue()
    await queue.connect()
    for start in range(0, jobs, BATCH):
        await asyncio.gather(*(queue.enqueue('incr_async') for _ in range(start, min(start + BATCH, jobs))))
    await queue.disconnect()


async def work_saq(concurrency: int) -> None:
    from saq import Worker

    await Worker(saq_queue(), functions=[incr_async], concurrency=concurrency).start()  # stops on SIGTERM


def dramatiq_actor() -> Any:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=os.environ['REDIS_URL'])
    dramatiq.set_broker(broker)
    return dramatiq.actor(incr, actor_name='incr', queue_name=QUEUE, broker=broker)


def fill_dramatiq(jobs: int) -> None:
    actor = dramatiq_actor()
    for _ in range(jobs):
        actor.send()


def work_dramatiq(concurrency: int) -> None:
    """Dramatiq's Worker in this process (its CLI forks processes of its own)."""
    import dramatiq

    actor = dramatiq_actor()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the worker's threads leave it to sigwait
    worker = dramatiq.Worker(actor.broker, worker_threads=concurrency)
    worker.start()
    signal.sigwait({signal.SIGTERM})
    worker.stop()


def celery_app() -> Any:
    from celery import Celery

    app = Celery('bench', broker=os.environ['REDIS_URL'], backend=os.environ['REDIS_URL'])
    app.task(name='incr')(incr)
    return app


def fill_celery(jobs: int) -> None:
    task = celery_app().tasks['incr']
    for _ in range(jobs):
        task.delay()


def work_celery(pool: str, concurrency: int) -> None:
    argv = ['worker', '--pool', pool, '--concurrency', str(concurrency), '--loglevel', 'WARNING']
    celery_app().worker_main(argv)  # warm shutdown on SIGTERM


def fill_rq(jobs: int) -> None:
    from rq import Queue

    queue = Queue(QUEUE, connection=client())
    for start in range(0, jobs, BATCH):
        queue.enqueue_many(
            [Queue.prepare_data('bench.peers.incr') for _ in range(start, min(start + BATCH, jobs))]
        )


def work_rq(_: int) -> None:
    from rq import Queue, SimpleWorker

    SimpleWorker([Queue(QUEUE, connection=client())], connection=client()).work(logging_level='WARNING')


FILL: dict[str, Callable[[int], None]] = {
    'saq': lambda jobs: asyncio.run(fill_saq(jobs)),
    'dramatiq': fill_dramatiq,
    'celery_threads': fill_celery,
    'celery_solo': fill_celery,
    'rq': fill_rq,
}
WORK: dict[str, Callable[[int], None]] = {
    'saq': lambda concurrency: asyncio.run(work_saq(concurrency)),
    'dramatiq': work_dramatiq,
    'celery_threads': lambda concurrency: work_celery('threads', concurrency),
    'celery_solo': lambda _: work_celery('solo', 1),
    'rq': work_rq,
}

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('action', choices=['fill', 'work'])
    parser.add_argument('kind', choices=list(PEERS))
    parser.add_argument('number', type=int, help='jobs to queue (fill), or the concurrency (work)')
    args = parser.parse_args()
    (FILL if args.action == 'fill' else WORK)[args.kind](args.number)
