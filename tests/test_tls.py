"""The lab switched to TLS for Redis and PostgreSQL end to end, then back to plain connections.

playbooks/lab.yml with lab_fleet_tls makes the lab CA and lab-db's certificate and puts them on
the hosts; a copy of the lab inventory with `lab_fleet_tls: true` deploys the production
inventory's TLS settings (rediss:// and sslmode=verify-full DSNs, Redis TLS-only, hostssl). The
tests run in file order on the lab that test_deploy.py left; the last one restores the plain lab
that later modules rely on (the fixture does it too when a test fails before).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from .conftest import REDIS_PORT, REDIS_TLS_PORT, WORKERS, Lab, Run, ansible_playbook, assert_deployed


@dataclass
class Switch:
    plain: Lab  # the lab's own inventory
    tls: Lab  # its copy with lab_fleet_tls: true
    first: Run  # the deploy that switched the lab to TLS
    restored: bool = False


@pytest.fixture(scope='module')
def switch(deployed: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switch]:
    certs = ansible_playbook(deployed.inventory, 'playbooks/lab.yml', '-e', 'lab_fleet_tls=true')
    assert certs.returncode == 0, certs.output[-5000:]
    tls = deployed.copy(tmp_path_factory.mktemp('tls') / 'inventory')
    tls.set_vars('group_vars/all/tls.yml', {'lab_fleet_tls': True})
    state = Switch(deployed, tls, tls.deploy())
    yield state
    if not state.restored:
        assert_deployed(deployed.deploy())


def host_file(host: str, path: str) -> tuple[str, str, str]:
    """Owner, group and octal mode of a file on a lab host."""
    out = subprocess.run(
        ['podman', 'exec', host, 'stat', '--format', '%U %G %a', path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], out[1], out[2]


def env_file_has(host: str, text: str) -> bool:
    """The workers' env file on `host` contains `text` (the file itself holds secrets: not shown)."""
    found = subprocess.run(
        ['podman', 'exec', host, 'grep', '-qF', '--', text, '/etc/arq-worker/worker.env'], check=False
    )
    return found.returncode == 0


def wait_for_healthy_workers(lab: Lab) -> dict[str, dict[str, object]]:
    """Every worker process beats, running, with its database ok (generous bound: a busy machine)."""
    deadline = time.monotonic() + 60
    while True:
        beats = lab.heartbeats()
        healthy = {b['host'] for b in beats.values() if b['state'] == 'running' and b['database'] == 'ok'}
        if (len(beats) == sum(WORKERS.values()) and healthy == set(WORKERS)) or time.monotonic() > deadline:
            return beats
        time.sleep(1)


def test_the_lab_deploys_with_tls_on(switch: Switch) -> None:
    assert_deployed(switch.first)
    assert host_file('lab-db', '/etc/ssl/flowworker/server.key') == ('root', 'ssl-cert', '640')
    for host in ['lab-db', *WORKERS]:
        assert host_file(host, '/etc/ssl/flowworker/ca.crt') == ('root', 'root', '644')
    for host in WORKERS:
        assert env_file_has(host, 'REDIS_URL=rediss://'), host
        assert env_file_has(host, '@lab-db:5432/flows?sslmode=verify-full'), host
        assert env_file_has(host, 'DATABASE_SSLROOTCERT=/etc/ssl/flowworker/ca.crt'), host


def test_the_lab_ca_lives_in_the_git_ignored_lab_dir(switch: Switch) -> None:
    ca = switch.plain.ca
    assert ca.exists()
    ignored = subprocess.run(
        ['git', 'check-ignore', '-q', str(ca.parent / 'ca.key')], cwd=Path(__file__).parent, check=False
    )
    assert ignored.returncode == 0


def test_every_worker_reports_its_database_ok_over_tls(switch: Switch) -> None:
    beats = wait_for_healthy_workers(switch.tls)
    assert len(beats) == sum(WORKERS.values())
    assert {beat['state'] for beat in beats.values()} == {'running'}
    assert {beat['database'] for beat in beats.values()} == {'ok'}

    async def worker_sessions() -> asyncpg.Record:
        db = await asyncpg.connect(switch.tls.worker_dsn())
        try:
            return await db.fetchrow(
                'SELECT count(*) FILTER (WHERE NOT s.ssl) AS plain, count(DISTINCT a.client_addr) AS hosts'
                ' FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)'
                " WHERE a.usename = 'flow_worker' AND a.pid <> pg_backend_pid()"
            )
        finally:
            await db.close()

    sessions = asyncio.run(worker_sessions())
    assert sessions['plain'] == 0
    assert sessions['hosts'] == len(WORKERS)


def test_flows_from_a_rediss_producer_all_succeed_and_are_recorded_over_verify_full(
    switch: Switch,
) -> None:
    assert switch.tls.redis_url().startswith('rediss://')
    assert 'sslmode=verify-full' in switch.tls.worker_dsn()

    results, records = switch.tls.run_flows(50)

    assert results == [{'n': n} for n in range(50)]
    assert len(records) == 50
    assert {r['worker_id'].split(':')[0] for r in records} <= set(WORKERS)


@pytest.mark.parametrize('port', [REDIS_TLS_PORT, REDIS_PORT], ids=['tls-port', 'plain-port'])
def test_redis_refuses_a_client_without_tls(switch: Switch, port: int) -> None:
    async def ping() -> None:
        client = redis.asyncio.Redis(
            host='127.0.0.1',
            port=port,
            username='producer',
            password=switch.tls.redis_password('producer'),
            socket_timeout=10,
        )
        try:
            await client.ping()
        finally:
            await client.aclose()

    with pytest.raises(RedisConnectionError):
        asyncio.run(ping())


def test_postgresql_refuses_the_worker_role_without_tls(switch: Switch) -> None:
    async def connect() -> None:
        db = await asyncpg.connect(switch.plain.worker_dsn(), ssl=False)
        await db.close()

    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match='no encryption'):
        asyncio.run(connect())


def test_a_second_deploy_with_tls_changes_nothing(switch: Switch) -> None:
    run = switch.tls.deploy()
    assert_deployed(run)
    assert run.changed_hosts() == set(), run.output[-5000:]


def test_the_lab_goes_back_to_plain_connections(switch: Switch) -> None:
    run = switch.plain.deploy()

    assert_deployed(run)
    switch.restored = True
    beats = wait_for_healthy_workers(switch.plain)
    assert len(beats) == sum(WORKERS.values())
    assert {beat['database'] for beat in beats.values()} == {'ok'}
    for host in WORKERS:
        assert env_file_has(host, 'REDIS_URL=redis://'), host
    results, records = switch.plain.run_flows(20)
    assert results == [{'n': n} for n in range(20)]
    assert len(records) == 20
