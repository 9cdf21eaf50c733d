"""Redis Sentinel (REDIS_SENTINELS): a worker finds its master through the sentinels and follows
it through a failover, without a restart; every test on plain TCP and on TLS only (the sentinel,
the nodes, replication and the sentinel's links: REDIS_SENTINEL_TLS and REDIS_TLS)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from arq.connections import ArqRedis
from redis.asyncio.sentinel import MasterNotFoundError

from flowworker.infrastructure import count_redis_reconnects, create_redis
from flowworker.settings import Settings, load_settings

from .conftest import Stack, open_stack
from .monitoring import MonitorProcess
from .servers import RedisServer, SentinelGroup, TLSFiles, free_port
from .test_metrics import scrape
from .test_monitor import API

# the data in database 1: the connections and the wake-up's keyspace channel must both take it
DB = 1


@pytest.fixture(scope='module', params=['plain', 'tls'])
def sentinels(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SentinelGroup]:
    tls = TLSFiles.make(tmp_path_factory.mktemp('tls')) if request.param == 'tls' else None
    group = SentinelGroup(tmp_path_factory.mktemp('sentinel'), tls)
    group.start()
    yield group
    group.stop()


def tls_env(sentinels: SentinelGroup, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The settings of TLS to the sentinel and its master; the tests' own handles (arq's and
    redis-py's, from ``rediss://`` URLs) verify the test CA as the system's."""
    if sentinels.tls is None:
        return {}
    monkeypatch.setenv('SSL_CERT_FILE', str(sentinels.tls.ca))
    return {'REDIS_SENTINEL_TLS': 'true', 'REDIS_TLS': 'true', 'REDIS_TLS_CA_CERTS': str(sentinels.tls.ca)}


def admin_url(node: RedisServer) -> str:
    """The tests' own handle on ``node``: a plain arq producer connects to the master directly."""
    return node.url.removesuffix('/0') + f'/{DB}'


@pytest.fixture
async def sentinel_stack(
    sentinels: SentinelGroup, database: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stack]:
    for name in ('REDIS_URL', 'REDIS_HOST'):  # the workers inherit this environment
        monkeypatch.delenv(name, raising=False)
    env = {
        'REDIS_SENTINELS': sentinels.address,
        'REDIS_SENTINEL_MASTER': SentinelGroup.NAME,
        'REDIS_SENTINEL_PASSWORD': SentinelGroup.PASSWORD,
        # the master's and the replica's own AUTH, as flowworker's worker user
        'REDIS_USERNAME': 'worker',
        'REDIS_PASSWORD': 'worker-password',
        'REDIS_DB': str(DB),
        **tls_env(sentinels, monkeypatch),
    }
    async with open_stack(env, admin_url(sentinels.master()), database, tmp_path) as stack:
        yield stack


async def test_a_worker_runs_the_jobs_of_the_master_the_sentinels_name(sentinel_stack: Stack) -> None:
    worker = await sentinel_stack.start_worker()
    jobs = [await sentinel_stack.enqueue('demo.echo', {'n': n}) for n in range(3)]

    tasks = await sentinel_stack.wait_final(jobs)

    assert {t['status'] for t in tasks} == {'succeeded'}
    # the wake-up heard its probe on database 1's keyspace channel: it listens, not polls
    assert 'polling the queue' not in worker.output()
    assert worker.stop() == 0


async def test_after_a_failover_the_same_worker_and_monitor_use_the_new_master(
    sentinels: SentinelGroup, sentinel_stack: Stack, tmp_path: Path
) -> None:
    port = free_port()
    worker = await sentinel_stack.start_worker('--metrics-port', str(port))
    await sentinel_stack.wait_final([await sentinel_stack.enqueue('demo.echo', {'n': 0})])
    old = sentinels.master()
    # the monitor says which node is master, and follows the failover as the worker does
    logins = {'REDIS_USERNAME': 'monitor', 'REDIS_PASSWORD': 'monitor-password'}
    with MonitorProcess({**sentinel_stack.env, **logins}, tmp_path) as monitor:

        async def master_shown() -> object:
            async with monitor.client() as client:
                return (await client.get(f'{API}/redis')).json()

        assert await master_shown() == {'address': f'127.0.0.1:{old.port}', 'sentinels': True}

        with sentinels.client() as sentinel:
            assert sentinel.sentinel_failover(SentinelGroup.NAME)

        async def switched() -> bool:
            return sentinels.master() is not old

        await sentinel_stack.wait_for(switched, 30, 'the sentinel to name the replica master')
        # the producer and the tests' handles move to the new master, as any client of the sentinels does
        sentinel_stack.admin_url = admin_url(sentinels.master())
        await sentinel_stack.reconnect()
        # the heartbeat replicated before the switch lives on for its TTL: deleted, only the worker
        # writing to the new master brings it back
        key = f'arq:worker:{worker.worker_id}'
        await sentinel_stack.redis.delete(key)
        job = await sentinel_stack.enqueue('demo.echo', {'n': 1})

        [task] = await sentinel_stack.wait_final([job], timeout=30)

        assert task['status'] == 'succeeded'
        beat = await sentinel_stack.wait_for(
            lambda: sentinel_stack.redis.get(key), 30, 'the heartbeat on the new master', alive=worker
        )
        assert json.loads(beat)['pid'] == worker.pid  # the same process: not restarted

        # the connections to the old master were made anew to the new one, and counted
        # (count_redis_reconnects on the Sentinel pool's connection class): those redis-py moved
        # when a sentinel named the new master, those the old master closed once demoted (Sentinel
        # demotes it within its 10 s INFO period; the pub/sub held in use stays on it until then)
        async def reconnected() -> bool:
            return (await scrape(port))[('flowworker_redis_reconnects_total', ())] >= 1

        await sentinel_stack.wait_for(reconnected, 30, 'a counted Redis reconnect', alive=worker)
        assert worker.stop() == 0
        new = {'address': f'127.0.0.1:{sentinels.master().port}', 'sentinels': True}
        assert await master_shown() == new
        async with monitor.client() as client:
            assert (
                f'Redis 127.0.0.1:{sentinels.master().port}, the master the sentinels name'
                in (await client.get('/workers')).text
            )


def sentinel_settings(sentinels: SentinelGroup, master: str = SentinelGroup.NAME) -> Settings:
    tls = sentinels.tls
    return load_settings(
        None,
        redis_sentinel_tls=str(bool(tls)),
        redis_tls=str(bool(tls)),
        redis_tls_ca_certs=str(tls.ca) if tls else None,
        database_url='postgresql://u:p@127.0.0.1:1/app',
        redis_sentinels=sentinels.address,
        redis_sentinel_master=master,
        redis_sentinel_password=SentinelGroup.PASSWORD,
        redis_username='worker',
        redis_password='worker-password',
        redis_db=str(DB),
    )


async def test_the_pool_closes_its_sentinel_connections_and_retries_at_start(
    sentinels: SentinelGroup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ('REDIS_URL', 'REDIS_HOST'):
        monkeypatch.delenv(name, raising=False)

    def sentinel_clients() -> int:
        with sentinels.client() as sentinel:
            return len(sentinel.client_list())

    before = sentinel_clients()
    redis = await create_redis(sentinel_settings(sentinels))
    assert isinstance(redis, ArqRedis)
    assert redis.default_queue_name == 'arq:queue:default'
    await count_redis_reconnects(redis, lambda: None)  # SentinelManagedConnection takes the mixin
    assert await redis.set('arq:probe', b'1')
    assert sentinel_clients() > before
    await redis.aclose(close_connection_pool=True)
    assert sentinel_clients() == before

    # a master no sentinel knows: PING tried once more, logged, then the error
    with pytest.raises(MasterNotFoundError):
        await create_redis(sentinel_settings(sentinels, 'no-such-master'), connect_retries=1)
    [warning] = [r.getMessage() for r in caplog.records if r.name == 'flowworker.infrastructure']
    assert warning.startswith(
        f"cannot reach the Redis master 'no-such-master' through the sentinels {sentinels.address} "
        '(MasterNotFoundError: '
    )
    assert warning.endswith(', 1 retries remaining')
    assert SentinelGroup.PASSWORD not in warning
    assert sentinel_clients() == before
