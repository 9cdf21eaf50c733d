"""A worker process's own Prometheus metrics (FLOWWORKER_METRICS_PORT): exact values after known jobs."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import urllib.request

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from flowworker.version import VERSION

from .conftest import QUEUE, WORKER, Stack
from .servers import PostgresServer, free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as response:
            return str(response.read().decode())

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(await asyncio.to_thread(get))
        for sample in family.samples
    }


async def test_a_worker_counts_its_tasks_their_durations_and_how_long_they_waited(stack: Stack) -> None:
    # due 5 s before the worker starts: its pickup latency is at least that
    late = await stack.enqueue('demo.echo', {'n': -1})
    await stack.redis.zadd(QUEUE, {late: int((time.time() - 5) * 1000)}, xx=True)
    port = free_port()
    # served on the port plus the offset, as a systemd template unit's instance 2 would be
    worker = await stack.start_worker(
        '--max-jobs', '1', '--metrics-port', str(port - 2), '--metrics-port-offset', '2'
    )
    succeeded = [await stack.enqueue('demo.echo', {'n': n}) for n in range(3)]
    failed = [await stack.enqueue('demo.fail') for _ in range(2)]
    # a producer's typo: failed before it starts, counted under a fixed label
    unknown = await stack.enqueue('no.such.flow')
    await stack.wait_final([late, *succeeded, *failed, unknown])
    running = await stack.enqueue('demo.sleep', {'seconds': 120})
    await stack.wait_for(lambda: stack.attempts(running), 30, 'the sleep job to start')

    samples = await scrape(port)

    def tasks(flow: str, status: str) -> float:
        return samples[('flowworker_tasks_total', (('flow', flow), ('queue', 'default'), ('status', status)))]

    def duration(flow: str, part: str) -> float:
        return samples[(f'flowworker_task_duration_seconds_{part}', (('flow', flow), ('queue', 'default')))]

    def pickup(part: str, le: str | None = None) -> float:
        labels = (('le', le), ('queue', 'default')) if le else (('queue', 'default'),)
        return samples[(f'flowworker_pickup_latency_seconds_{part}', labels)]

    assert (tasks('demo.echo', 'succeeded'), tasks('demo.fail', 'failed'), tasks('<unknown>', 'failed')) == (
        4,
        2,
        1,
    )
    assert not any(dict(labels).get('flow') == 'no.such.flow' for _, labels in samples)
    assert (duration('demo.echo', 'count'), duration('demo.fail', 'count')) == (4, 2)
    assert 0 < duration('demo.echo', 'sum') < 30
    # six started and ended, the sleep job started: seven waits, one of them of 5 s or more
    assert pickup('count') == 7
    assert pickup('bucket', '+Inf') == 7
    assert pickup('bucket', '2.5') == 6
    assert 5 <= pickup('sum') < 60
    assert samples[('flowworker_jobs_in_progress', ())] == 1
    assert samples[('flowworker_max_jobs', ())] == 1
    assert samples[('flowworker_records_waiting', ())] >= 0
    # a start row and an end row per attempt, the one replacing the other while both wait
    assert samples[('flowworker_records_written_total', ())] >= 7
    info = (('queue', 'default'), ('version', VERSION), ('worker_id', worker.worker_id))
    assert samples[('flowworker_worker_info', info)] == 1
    assert samples[('flowworker_drains_total', ())] == 0

    worker.signal(signal.SIGUSR1)

    async def drained() -> bool:
        return (await scrape(port))[('flowworker_drains_total', ())] == 1

    await stack.wait_for(drained, 10, 'the drain to be counted', alive=worker)
    histograms = {
        f'{name}_{part}'
        for name in ('flowworker_task_duration_seconds', 'flowworker_pickup_latency_seconds')
        for part in ('bucket', 'count', 'sum')
    }
    assert {name for name, _ in samples if not name.endswith('_created')} == histograms | {
        'flowworker_tasks_total',
        'flowworker_jobs_in_progress',
        'flowworker_max_jobs',
        'flowworker_records_waiting',
        'flowworker_records_written_total',
        'flowworker_worker_info',
        'flowworker_drains_total',
        'flowworker_redis_reconnects_total',
        'flowworker_database_reconnects_total',
    }


async def test_a_metrics_port_in_use_stops_the_worker_with_the_setting_named(stack: Stack) -> None:
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = await stack.start_worker('--metrics-port', str(port), wait=False)
        assert worker.wait() == 2
    assert (
        f'cannot serve the metrics on 127.0.0.1:{port} (FLOWWORKER_METRICS_PORT): Address already in use'
        in (worker.output())
    )


async def test_a_worker_counts_the_connections_it_lost_and_made_anew(
    stack: Stack, postgres_server: PostgresServer
) -> None:
    port = free_port()
    await stack.start_worker('--metrics-port', str(port))
    await stack.wait_final([await stack.enqueue('demo.echo', {'n': n}) for n in range(3)])

    def reconnects(samples: Samples) -> tuple[float, float]:
        return (
            samples[('flowworker_redis_reconnects_total', ())],
            samples[('flowworker_database_reconnects_total', ())],
        )

    # the records' flusher holds a connection of its own; the first sweep (after 3 heartbeat
    # intervals, 3 s here) takes a second one
    await stack.wait_for(
        lambda: stack.db.fetchval('SELECT count(*) >= 2 FROM pg_stat_activity WHERE usename = $1', WORKER),
        10,
        "the sweep's PostgreSQL connection",
    )
    # the connections opened at start-up and as the pools grew are no reconnects
    assert reconnects(await scrape(port)) == (0, 0)

    # every connection of the worker's Redis user and PostgreSQL role, closed by the servers
    killed = await stack.redis.client_kill_filter(user='worker')
    superuser = await asyncpg.connect(postgres_server.dsn())  # the owner may not signal the worker's role
    try:
        terminated = await superuser.fetchval(
            'SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity '
            'WHERE usename = $1',
            WORKER,
        )
    finally:
        await superuser.close()
    assert killed >= 2  # the subscription and the pool's connections
    assert terminated == 2

    jobs = [await stack.enqueue('demo.echo', {'n': n}) for n in range(5)]
    tasks = await stack.wait_final(jobs)
    assert {t['status'] for t in tasks} == {'succeeded'}

    # each terminated backend is one pool entry, re-made (its pre-ping fails) the next time it is
    # checked out: the flusher's at the next write, the sweep's at its next run
    async def database_reconnected() -> bool:
        return reconnects(await scrape(port))[1] >= 2

    await stack.wait_for(database_reconnected, 10, 'two PostgreSQL reconnects')
    redis, database = reconnects(await scrape(port))
    assert database == 2
    # the subscription, which redis-py re-makes (and re-subscribes) at once, and at least the pool
    # connection the next command took; a killed one left idle under the pool's LIFO stack is
    # re-made only when a burst needs it again, so not every one killed need be counted yet
    assert 2 <= redis <= killed
    # and the jobs after them were recorded through the new connections
    more = [await stack.enqueue('demo.echo', {'n': n}) for n in range(3)]
    assert {t['status'] for t in await stack.wait_final(more)} == {'succeeded'}
    # (a poll and a batch of job ends may run at once, each on a pool connection: a burst may
    # reach, and re-make, one more of the killed ones)
    later, database = reconnects(await scrape(port))
    assert (redis <= later <= killed, database) == (True, 2)
