"""Restarts and scale changes under load against the lab fleet: no job lost, gated on health.

A producer on the controller enqueues `demo.sleep` flows of 0.2-3 s the whole time a playbook
runs, while a sampler reads the heartbeats; afterwards every job must have run exactly once and
succeeded (PostgreSQL's flow_task_attempts), and each host must have kept N-1 of its N
instances running at every sampled moment. The tests run in file order on one fleet (3
instances on each worker host, from a copy of the lab inventory); the last one deploys the lab's
own inventory again.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from arq.connections import RedisSettings, create_pool

from .conftest import (
    LAB_KEYS,
    QUEUE,
    Lab,
    Load,
    ansible_playbook,
    assert_deployed,
    current_version,
    flow_package,
    keys_of,
    podman_exec,
    running_attempt,
    runs_as_its_inventory_says,
    wait_until,
)

FLEET = {'lab-worker-1': 3, 'lab-worker-2': 3}
ROLLING_RESTART = 'playbooks/rolling_restart.yml'


def running_pids(lab: Lab) -> dict[str, int]:
    return {key: beat['pid'] for key, beat in lab.heartbeats().items() if beat['state'] == 'running'}


@pytest.fixture(scope='module')
def fleet(deployed: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The lab with 3 instances on each worker host (a copied inventory); the lab's own inventory
    is deployed again afterwards."""
    fleet = deployed.copy(tmp_path_factory.mktemp('rolling') / 'inventory')
    fleet.set_vars('host_vars/lab-worker-2.yml', {'arq_worker_instances': FLEET['lab-worker-2']})
    assert_deployed(fleet.deploy())
    yield fleet
    # the last test deploys the lab's own inventory; again here when it could not
    if not runs_as_its_inventory_says(deployed):
        assert_deployed(deployed.deploy())
    assert set(deployed.heartbeats()) == LAB_KEYS


def test_rolling_restart_under_load_loses_no_job_and_keeps_n_minus_1_running(fleet: Lab) -> None:
    before = running_pids(fleet)
    assert set(before) == set().union(*(keys_of(h, n) for h, n in FLEET.items()))

    with Load(fleet) as load:
        run = ansible_playbook(fleet.inventory, ROLLING_RESTART)

    assert run.returncode == 0, run.output[-5000:]
    after = running_pids(fleet)
    assert set(after) == set(before)
    assert all(after[key] != before[key] for key in before), (before, after)
    reports = re.findall(
        r'(arq-worker@\d\.service): drained in ([0-9.]+) s \((.*?)\), stopped, started', run.output
    )
    assert len(reports) == sum(FLEET.values()), run.output[-5000:]
    load.assert_every_job_succeeded_once()
    for host, instances in FLEET.items():
        # N-1 at the worst moment: never fewer, and the sampler did see the restarts
        assert load.fewest_running(host) == instances - 1, (host, load.samples)


def test_check_mode_and_limit_report_the_instances_and_touch_nothing(fleet: Lab) -> None:
    before = running_pids(fleet)

    check = ansible_playbook(fleet.inventory, ROLLING_RESTART, '--check', '--limit', 'lab-worker-2')
    skipped = ansible_playbook(fleet.inventory, ROLLING_RESTART, '--skip-tags', 'arq_worker_restart')

    assert check.returncode == 0, check.output[-5000:]
    assert set(check.recap) == {'lab-worker-2'}
    for n in range(1, FLEET['lab-worker-2'] + 1):
        assert f'arq-worker@{n}.service: would quiet it, drain it' in check.output, check.output[-5000:]
    assert skipped.returncode == 0, skipped.output[-5000:]
    assert skipped.changed_hosts() == set()
    assert running_pids(fleet) == before


def test_a_new_worker_version_deployed_under_load_loses_no_job(
    fleet: Lab, tmp_path_factory: pytest.TempPathFactory
) -> None:
    before = running_pids(fleet)
    versions = {host: current_version(host) for host in FLEET}
    package = flow_package(tmp_path_factory.mktemp('release'))
    fleet.set_vars(
        'group_vars/arq_workers.yml',
        {'arq_worker_flow_packages': [str(package)], 'arq_worker_flow_modules': ['extra_flows']},
    )

    with Load(fleet) as load:
        run = fleet.deploy()

    assert_deployed(run)
    assert all(current_version(host) != versions[host] for host in FLEET)
    after = running_pids(fleet)
    assert set(after) == set(before)
    assert all(after[key] != before[key] for key in before), (before, after)
    load.assert_every_job_succeeded_once()
    for host, instances in FLEET.items():
        assert load.fewest_running(host) == instances - 1, (host, load.samples)

    async def new_flow() -> Any:
        producer = await create_pool(RedisSettings.from_dsn(fleet.redis_url()))
        try:
            job = await producer.enqueue_job('run_flow', 'extra.version', {}, _queue_name=QUEUE)
            assert job is not None
            return await job.result(timeout=60, poll_delay=0.2)
        finally:
            await producer.aclose()

    assert asyncio.run(new_flow()) == 'extra-flows 1.0'


def test_a_scale_down_under_load_drains_and_loses_no_job(fleet: Lab) -> None:
    before = running_pids(fleet)
    fleet.set_vars('host_vars/lab-worker-1.yml', {'arq_worker_instances': 1})

    with Load(fleet) as load:
        run = fleet.deploy('--limit', 'lab-worker-1')  # as the README says to scale one host

    assert run.returncode == 0, run.output[-5000:]
    assert set(run.recap) == {'lab-worker-1'}
    assert run.recap['lab-worker-1']['changed'] > 0
    after = running_pids(fleet)
    kept = keys_of('lab-worker-1', 1) | keys_of('lab-worker-2', FLEET['lab-worker-2'])
    assert set(after) == kept
    assert {key: after[key] for key in kept} == {key: before[key] for key in kept}
    load.assert_every_job_succeeded_once()
    assert load.fewest_running('lab-worker-2') == FLEET['lab-worker-2']
    assert load.fewest_running('lab-worker-1') == 1


def leftovers(host: str, manager: str) -> list[str]:
    """What `manager` still holds of the workers on `host`: files, units, programs."""
    if manager == 'systemd':
        script = (
            'ls -d /etc/systemd/system/arq-worker* /etc/systemd/system/*.wants/arq-worker* 2>/dev/null;'
            " systemctl list-units --all --plain --no-legend 'arq-worker*' | awk '{print $1}'"
        )
    else:
        script = (
            'ls /etc/supervisor/conf.d/arq-worker* /var/log/arq-worker/arq-worker_* 2>/dev/null'
            ' | grep -v arq-worker-rpc.conf;'
            ' supervisorctl status 2>/dev/null | grep arq-worker'
        )
    return podman_exec(host, 'sh', '-c', f'{script}; true').split()


@pytest.mark.parametrize(('old', 'new'), [('systemd', 'supervisor'), ('supervisor', 'systemd')])
def test_a_change_of_process_manager_under_load_replaces_each_instance_and_leaves_nothing(
    fleet: Lab, old: str, new: str
) -> None:
    host, count = 'lab-worker-2', FLEET['lab-worker-2']
    names = {
        'systemd': [f'arq-worker@{n}' for n in range(1, count + 1)],
        'supervisor': [f'arq-worker_{n:02d}' for n in range(1, count + 1)],
    }
    fleet.set_vars(f'host_vars/{host}.yml', {'arq_worker_process_manager': new})

    with Load(fleet) as load:
        run = fleet.deploy('--limit', host)

    assert run.returncode == 0, run.output[-5000:]
    assert set(run.recap) == {host}
    assert {key for key, beat in fleet.heartbeats().items() if beat['host'] == host} == {
        f'arq:worker:{host}:{name}' for name in names[new]
    }
    assert not [path for path in leftovers(host, old) if 'arq-worker' in path], leftovers(host, old)
    load.assert_every_job_succeeded_once()
    # each old instance drained before its successor started: never fewer than N-1, never more than N
    assert load.fewest_running(host) == count - 1, load.samples
    assert load.most_running(host) == count, load.samples
    again = fleet.deploy('--limit', host)
    assert again.returncode == 0, again.output[-5000:]
    assert again.recap[host]['changed'] == 0, again.output[-5000:]


def test_a_worker_killed_mid_job_leaves_a_lost_attempt_and_another_instance_runs_the_job(
    fleet: Lab,
) -> None:
    async def run() -> tuple[str, list[asyncpg.Record], Any]:
        producer = await create_pool(RedisSettings.from_dsn(fleet.redis_url()))
        db = await asyncpg.connect(fleet.worker_dsn())
        try:
            job = await producer.enqueue_job('run_flow', 'demo.sleep', {'seconds': 10}, _queue_name=QUEUE)
            assert job is not None
            worker_id = await running_attempt(db, job.job_id)
            host, instance = worker_id.split(':')
            pid = podman_exec(
                host, 'systemctl', 'show', '--property=MainPID', '--value', f'{instance}.service'
            )
            # killed, and kept from coming back (systemd would restart it after 5 s, and a
            # restarted instance releases its own jobs): the others must notice on their own
            podman_exec(
                host,
                'sh',
                '-c',
                f'systemctl kill --kill-whom=main --signal=SIGKILL {instance}.service'
                f' && systemctl stop {instance}.service',
            )
            state = podman_exec(host, 'systemctl', 'is-active', f'{instance}.service', check=False)
            assert state in ('inactive', 'failed'), state
            assert (
                podman_exec(host, 'sh', '-c', f'kill -0 {pid} 2>/dev/null && echo alive || echo gone')
                == 'gone'
            )
            try:
                result = await job.result(timeout=120, poll_delay=0.5)
            finally:
                podman_exec(host, 'systemctl', 'start', f'{instance}.service')
            async with asyncio.timeout(30):
                while (
                    rows := await db.fetch(
                        'SELECT attempt, status, worker_id FROM flow_task_attempts '
                        'WHERE job_id = $1 ORDER BY attempt',
                        job.job_id,
                    )
                ) and rows[-1]['status'] != 'succeeded':
                    await asyncio.sleep(0.2)
            return worker_id, rows, result
        finally:
            await db.close()
            await producer.aclose()

    killed, attempts, result = asyncio.run(run())

    assert result == {'slept': 10}
    assert [(a['attempt'], a['status']) for a in attempts] == [(1, 'lost'), (2, 'succeeded')], attempts
    assert attempts[0]['worker_id'] == killed
    assert attempts[1]['worker_id'] != killed
    back = keys_of('lab-worker-1', 1) | keys_of('lab-worker-2', FLEET['lab-worker-2'])
    wait_until(lambda: set(running_pids(fleet)) == back, 60, 'the instances running again')


def test_an_instance_that_cannot_start_stops_the_restart_on_its_host(deployed: Lab, fleet: Lab) -> None:
    host = 'lab-worker-2'
    podman_exec(
        host,
        'sh',
        '-c',
        'echo \'raise RuntimeError("this flow module is broken")\' > /srv/arq-worker/broken_flows.py'
        " && sed -i 's/^FLOWWORKER_FLOW_MODULES=.*/FLOWWORKER_FLOW_MODULES=broken_flows/'"
        ' /etc/arq-worker/worker.env',
    )
    before = running_pids(fleet)
    try:
        run = ansible_playbook(
            fleet.inventory, ROLLING_RESTART, '-e', 'arq_worker_restart_heartbeat_timeout=20'
        )

        assert run.returncode != 0
        assert f'arq-worker@1.service on {host} did not come back healthy' in run.output, run.output[-5000:]
        assert 'this flow module is broken' in run.output
        assert run.recap[host]['failed'] == 1
        after = running_pids(fleet)
        # the first host was restarted; on the broken one, instance 1 is down and 2, 3 run on untouched
        assert after[f'arq:worker:{host}:arq-worker@2'] == before[f'arq:worker:{host}:arq-worker@2']
        assert after[f'arq:worker:{host}:arq-worker@3'] == before[f'arq:worker:{host}:arq-worker@3']
        assert f'arq:worker:{host}:arq-worker@1' not in after
        assert after['arq:worker:lab-worker-1:arq-worker@1'] != before['arq:worker:lab-worker-1:arq-worker@1']
    finally:
        podman_exec(host, 'rm', '-f', '/srv/arq-worker/broken_flows.py')
        # the lab's own inventory, the module's last deploy: the env file is written again and
        # every instance of the lab comes back, the broken one included
        assert_deployed(deployed.deploy())
    assert set(running_pids(deployed)) == LAB_KEYS
