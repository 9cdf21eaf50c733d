"""systemd: template unit instances with the guide's names, a target, heartbeats."""

from __future__ import annotations

import pytest
from conftest import METRICS_PORT, SCENARIO, exposure, heartbeats, metrics

pytestmark = pytest.mark.skipif(SCENARIO not in ('default', 'pypi'), reason='systemd scenarios only')

# default ends scaled down to one instance (its side_effect.yml)
EXPECTED = {'default': 1, 'pypi': 2}.get(SCENARIO, 3)


@pytest.mark.parametrize('n', range(1, EXPECTED + 1))
def test_instances_are_enabled_and_running(host, n):
    unit = host.service(f'arq-worker@{n}.service')
    assert unit.is_enabled
    assert unit.is_running


def test_target_groups_the_instances(host):
    assert host.service('arq-worker.target').is_running
    assert host.service('arq-worker.target').is_enabled
    wants = host.check_output('ls /etc/systemd/system/arq-worker.target.wants/').split()
    assert sorted(wants) == sorted(f'arq-worker@{n}.service' for n in range(1, EXPECTED + 1))


def test_unit_has_the_guides_settings_and_more(host):
    unit = host.file('/etc/systemd/system/arq-worker@.service')
    assert unit.contains('^# Ansible managed') or unit.content_string.splitlines()[0].startswith('#')
    for line in (
        'Type=exec',
        'User=arq-worker',
        'Group=arq-worker',
        'Restart=always',
        'RestartSec=5',
        'StandardOutput=journal',
        'StandardError=journal',
        'TimeoutStopSec=40',
        'LimitNOFILE=20000',
        'NoNewPrivileges=yes',
        'ProtectSystem=strict',
        'ProtectHome=yes',
        'PrivateTmp=yes',
        'WantedBy=multi-user.target arq-worker.target',
    ):
        assert unit.contains(f'^{line}$'), line
    assert unit.contains(
        r'^ExecStart=/opt/arq-worker/current/bin/flowworker worker --queue-name default --max-jobs 10 '
        r'--job-timeout 3600 --drain-timeout 20 '
    )
    assert host.run('systemd-analyze verify arq-worker@1.service').rc == 0


def test_the_instances_and_the_prune_are_exposed_at_most_2_of_10(host):
    # systemd-analyze security: 3.0 with the sandbox of before SystemCallFilter, ProtectProc, PrivateUsers
    assert exposure(host, 'arq-worker@1.service') <= 2.0
    assert exposure(host, 'arq-worker-prune.service') <= 2.0


def test_one_heartbeat_per_instance(host, hostname):
    beats = heartbeats(host)
    assert sorted(beats) == sorted(f'{hostname}:arq-worker@{n}' for n in range(1, EXPECTED + 1))
    for beat in beats.values():
        assert beat['state'] == 'running'
        assert beat['database'] == 'ok'
        assert beat['queue'] == 'default'
        assert beat['max_jobs'] == 10


def test_heartbeat_pid_is_the_units_main_pid(host, hostname):
    beats = heartbeats(host)
    for n in range(1, EXPECTED + 1):
        pid = int(host.check_output(f'systemctl show --property=MainPID --value arq-worker@{n}.service'))
        assert beats[f'{hostname}:arq-worker@{n}']['pid'] == pid


@pytest.mark.skipif(SCENARIO != 'default', reason='the scaled-down default scenario only')
def test_nothing_of_the_removed_instances_is_left(host, hostname):
    listed = host.check_output("systemctl list-units --all --plain --no-legend 'arq-worker@*'")
    assert [line.split()[0] for line in listed.splitlines()] == ['arq-worker@1.service']
    leftovers = host.check_output(
        r"find /etc/systemd/system -name 'arq-worker@[2-9]*' -o -name 'arq-worker@[1-9][0-9]*'"
    )
    assert leftovers == ''
    assert host.check_output("find /etc/systemd/system -name 'arq-worker-background*'") == ''
    assert host.run('systemctl cat arq-worker-background.target').rc != 0
    for n in range(2, 6):
        assert host.run(f'systemctl is-enabled arq-worker@{n}.service').stdout.strip() == 'disabled'
    assert sorted(heartbeats(host)) == [f'{hostname}:arq-worker@1']


@pytest.mark.parametrize('n', range(1, EXPECTED + 1))
def test_each_instance_serves_its_metrics_on_its_own_port(host, hostname, n):
    served = metrics(host, METRICS_PORT + n)
    assert f'worker_id="{hostname}:arq-worker@{n}"' in served
    assert 'flowworker_max_jobs ' in served
