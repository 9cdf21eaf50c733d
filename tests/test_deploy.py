"""deploy.yml against the lab fleet: bad inventories on the lab made from nothing, then from
nothing, with a broken release, again, with one host rescaled, with a bad inventory.

The tests run in file order on one lab: the bad inventories first, while nothing is deployed;
the next deploys from nothing, the rest build on it.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from .conftest import (
    METRICS_PORT,
    REDIS_PORT,
    WORKERS,
    Lab,
    ansible_playbook,
    assert_deployed,
    current_version,
    flow_package,
    podman_exec,
    scrape_targets,
)

BAD_INVENTORIES = [
    (
        'group_vars/redis_servers.yml',
        {'redis_server_maxmemory_policy': 'allkeys-lru'},
        'allkeys-lru',
    ),
    (
        'group_vars/postgresql_servers.yml',
        {'postgresql_max_connections': 20},
        'Connection budget exceeded',
    ),
    (
        'group_vars/all/stack.yml',
        {'redis_server_users': [{'name': 'admin', 'password': 'x', 'acl': 'admin'}]},
        "the Redis server has no user 'worker' in redis_server_users (it has admin)",
    ),
    (
        'host_vars/lab-worker-1.yml',
        {'arq_worker_process_manager': 'docker'},
        'arq_worker_process_manager',
    ),
    (
        'host_vars/lab-worker-2.yml',
        {'arq_worker_instances': -1},
        'arq_worker_instances',
    ),
]
IDS = ['eviction-policy', 'connection-budget', 'missing-redis-user', 'process-manager', 'negative-count']
# what a deploy would put on a host: packages, directories, units (nothing on a lab made from nothing)
FOOTPRINT = (
    "dpkg-query -W -f='${Package}\\n' redis-server postgresql supervisor 2>/dev/null;"
    ' ls -d /etc/redis /etc/postgresql /etc/arq-worker /etc/arq-monitor /opt/arq-worker /opt/arq-monitor'
    ' 2>/dev/null;'
    " systemctl list-unit-files --no-legend 'arq-*' 'redis-server*' 'postgresql*'"
)


def footprint(host: str) -> str:
    return podman_exec(host, 'sh', '-c', FOOTPRINT, check=False)


@pytest.mark.parametrize(('relative', 'values', 'message'), BAD_INVENTORIES, ids=IDS)
def test_a_bad_inventory_fails_on_a_lab_made_from_nothing_before_any_host_changes(
    lab: Lab, tmp_path: Path, relative: str, values: dict[str, Any], message: str
) -> None:
    """Every check runs before any play changes a host, the cross-host ones (the connection
    budget) too: nothing is installed, written or started anywhere. (First in the session, while
    the lab is made from nothing.)"""
    hosts = ['lab-db', *WORKERS]
    if any(footprint(host) for host in hosts):
        pytest.skip('the lab is deployed already: these cases run first in a session')
    bad = lab.copy(tmp_path / 'inventory')
    bad.set_vars(relative, values)

    run = bad.deploy()

    assert run.returncode != 0
    assert message in run.output, run.output[-5000:]
    assert run.changed_hosts() == set(), run.output[-5000:]
    assert {host: footprint(host) for host in hosts} == dict.fromkeys(hosts, '')


def test_deploy_from_nothing_brings_every_service_up(deployed: Lab) -> None:
    beats = deployed.heartbeats()
    assert len(beats) == sum(WORKERS.values())
    for host, instances in WORKERS.items():
        assert sorted(k for k, b in beats.items() if b['host'] == host) == [
            f'arq:worker:{host}:arq-worker@{n}' for n in range(1, instances + 1)
        ]
    assert {beat['state'] for beat in beats.values()} == {'running'}
    assert {beat['database'] for beat in beats.values()} == {'ok'}


def test_200_flows_from_a_plain_arq_producer_all_succeed_and_are_recorded(
    deployed: Lab,
) -> None:
    results, records = deployed.run_flows(200)
    assert results == [{'n': n} for n in range(200)]
    assert len(records) == 200
    assert {r['worker_id'].split(':')[0] for r in records} <= set(WORKERS)


def test_the_worker_database_role_cannot_create_a_table(deployed: Lab) -> None:
    async def create() -> None:
        db = await asyncpg.connect(deployed.worker_dsn())
        try:
            await db.execute('CREATE TABLE intruder (id int)')
        finally:
            await db.close()

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        asyncio.run(create())


OWNER_LOGIN = """
import asyncio, sys
import asyncpg
async def main():
    try:
        await (await asyncpg.connect(sys.argv[1], ssl=False)).close()
        print('connected')
    except Exception as error:
        print(type(error).__name__, error)
asyncio.run(main())
"""


def test_postgresql_lets_the_schema_owner_in_from_the_migration_host_alone(deployed: Lab) -> None:
    """pg_hba: the owner from lab-worker-1, which migrates and prunes (stack_db_owner_host), and
    from no other worker host."""
    dsn = f'postgresql://flow_owner:{deployed.secret("postgresql_owner_password")}@lab-db:5432/flows'
    seen = {
        host: podman_exec(host, '/opt/arq-worker/current/bin/python', '-c', OWNER_LOGIN, dsn).strip()
        for host in WORKERS
    }
    assert seen['lab-worker-1'] == 'connected', seen
    assert 'no pg_hba.conf entry' in seen['lab-worker-2'], seen
    assert 'user "flow_owner"' in seen['lab-worker-2'], seen


def test_redis_rejects_a_client_without_the_password(deployed: Lab) -> None:
    async def ping() -> None:
        client = redis.asyncio.Redis(host='127.0.0.1', port=REDIS_PORT)
        try:
            await client.get('arq:queue:default')
        finally:
            await client.aclose()

    with pytest.raises((AuthenticationError, ResponseError), match=r'NOAUTH|Authentication required'):
        asyncio.run(ping())


def test_each_client_logs_in_as_its_redis_user_that_may_do_no_more_than_it_needs(deployed: Lab) -> None:
    """The lab's Redis has users and its default user off (inventories/lab/group_vars/all/stack.yml):
    the workers log in as `worker`, the monitor as `monitor`; as `worker`, what flowworker.acl
    leaves out is refused, and the default user with any password is refused."""
    for host, path, user in [
        *((host, '/etc/arq-worker/worker.env', 'worker') for host in WORKERS),
        ('lab-db', '/etc/arq-monitor/monitor.env', 'monitor'),
    ]:
        assert podman_exec(host, 'grep', '-c', f'^REDIS_URL=redis://{user}:', path).strip() == '1', host

    async def try_as(user: str, password: str, *command: str) -> str:
        client = redis.asyncio.Redis(host='127.0.0.1', port=REDIS_PORT, username=user, password=password)
        try:
            return str(await client.execute_command(*command))
        except (NoPermissionError, AuthenticationError) as error:
            return type(error).__name__
        finally:
            await client.aclose()

    worker = deployed.redis_password('worker')
    for command in (('FLUSHALL',), ('CONFIG', 'GET', 'maxmemory'), ('KEYS', '*'), ('SET', 'outside', 'x')):
        assert asyncio.run(try_as('worker', worker, *command)) == 'NoPermissionError', command
    assert asyncio.run(try_as('worker', worker, 'EXISTS', 'arq:queue:default')) in {'0', '1'}
    assert asyncio.run(try_as('default', worker, 'PING')) == 'AuthenticationError'


def test_a_broken_release_never_goes_live_and_a_second_deploy_changes_nothing(
    deployed: Lab, tmp_path: Path
) -> None:
    package = flow_package(tmp_path, 'broken-flows', "raise RuntimeError('this release is broken')\n")
    before = {host: (deployed.pids(host), current_version(host)) for host in WORKERS}
    broken = deployed.copy(tmp_path / 'inventory')
    broken.set_vars(
        'group_vars/arq_workers.yml',
        {
            'arq_worker_flow_packages': [str(package)],
            'arq_worker_flow_modules': ['broken_flows'],
        },
    )

    run = broken.deploy()

    assert run.returncode != 0
    assert 'this release is broken' in run.output
    assert {host: (deployed.pids(host), current_version(host)) for host in WORKERS} == before
    # the lab's own inventory again: its second deploy, which must change nothing at all
    again = deployed.deploy()
    assert_deployed(again)
    assert again.changed_hosts() == set(), again.output[-5000:]
    assert {host: (deployed.pids(host), current_version(host)) for host in WORKERS} == before


def test_changing_one_hosts_count_changes_only_that_host(deployed: Lab, tmp_path: Path) -> None:
    before = deployed.pids('lab-worker-1')
    scaled = deployed.copy(tmp_path / 'inventory')
    scaled.set_vars('host_vars/lab-worker-2.yml', {'arq_worker_instances': 3})

    up = scaled.deploy()

    assert_deployed(up)
    assert up.changed_hosts() == {'lab-worker-2'}
    assert deployed.pids('lab-worker-1') == before
    assert len(deployed.pids('lab-worker-2')) == 3
    # Prometheus's targets follow: the host's file on the Prometheus host lists the three
    assert [t['targets'] for t in scrape_targets('lab-worker-2')] == [
        [f'lab-worker-2:{METRICS_PORT + n}'] for n in (1, 2, 3)
    ]

    down = deployed.deploy()  # the lab's own inventory: back to 2

    assert_deployed(down)
    assert down.changed_hosts() == {'lab-worker-2'}
    assert len(deployed.pids('lab-worker-2')) == 2
    assert [t['targets'] for t in scrape_targets('lab-worker-2')] == [
        [f'lab-worker-2:{METRICS_PORT + n}'] for n in (1, 2)
    ]
    assert deployed.pids('lab-worker-1') == before


# (inventory file, variables, what the error says)
def test_a_bad_inventory_leaves_the_running_fleet_as_it_was(deployed: Lab, tmp_path: Path) -> None:
    """The cross-host check (the connection budget) on the deployed lab: no host changes, every
    instance keeps running."""
    relative, values, message = BAD_INVENTORIES[1]
    before = deployed.heartbeats()
    bad = deployed.copy(tmp_path / 'inventory')
    bad.set_vars(relative, values)

    run = bad.deploy()

    assert run.returncode != 0
    assert message in run.output
    assert run.changed_hosts() == set(), run.output[-5000:]
    # playbooks/postgresql.yml alone counts the workers too (it validates them itself)
    alone = ansible_playbook(bad.inventory, 'playbooks/postgresql.yml')
    assert alone.returncode != 0
    assert message in alone.output
    counted = re.search(r'may open \d+ connections \((.*?)\) \+ postgresql_reserved', alone.output)
    assert counted, alone.output[-5000:]
    # each worker host named with its instances (the budget's terms are "<host> N\u00d7(pool+overflow)")
    assert all(re.search(rf'\b{host} \d+\u00d7\(', counted[1]) for host in WORKERS), counted[1]
    assert alone.changed_hosts() == set(), alone.output[-5000:]
    assert deployed.heartbeats().keys() == before.keys()
