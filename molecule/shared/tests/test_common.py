"""Checks that hold whatever the process manager: install, config, OS tuning, a job end to end."""

from __future__ import annotations

import json
import shlex

import pytest
from conftest import ENV_FILE, SCENARIO, VENV, psql, redis, wait_for

pytestmark = pytest.mark.skipif(SCENARIO == 'bad_inputs', reason='the bad_inputs host has nothing installed')


def test_user_has_no_login_shell(host):
    user = host.user('arq-worker')
    assert user.exists
    assert user.shell == '/usr/sbin/nologin'
    assert user.group == 'arq-worker'


def test_current_points_at_a_versioned_virtualenv(host):
    current = host.file('/opt/arq-worker/current')
    assert current.is_symlink
    assert current.linked_to.startswith('/opt/arq-worker/versions/flowworker-')
    assert host.run(f'{VENV}/bin/flowworker --help').rc == 0


def test_env_file_is_private_to_the_worker_group(host):
    env = host.file(ENV_FILE)
    assert env.mode == 0o640
    assert env.user == 'root'
    assert env.group == 'arq-worker'
    assert env.contains('^DATABASE_URL=postgresql://flow_worker:')
    assert env.contains('^REDIS_URL=redis://')
    assert env.contains('^DATABASE_POOL_SIZE=20$')
    assert env.contains('^DATABASE_MAX_OVERFLOW=30$')
    assert env.contains('^DATABASE_POOL_RECYCLE=3600$')
    assert env.contains('^LOG_LEVEL=INFO$')


def test_limits_for_the_worker_user(host):
    limits = host.file('/etc/security/limits.d/60-arq-worker.conf')
    assert limits.exists
    lines = {tuple(line.split('#')[0].split()) for line in limits.content_string.splitlines()}
    for kind in ('soft', 'hard'):
        assert ('arq-worker', kind, 'nofile', '20000') in lines
        assert ('arq-worker', kind, 'nproc', '4096') in lines


def test_sysctl_file_is_rendered(host):
    sysctl = host.file('/etc/sysctl.d/60-arq-worker.conf')
    assert sysctl.exists
    lines = sysctl.content_string.splitlines()
    assert 'net.core.somaxconn=4096' in lines
    assert 'net.ipv4.tcp_keepalive_time=60' in lines
    assert 'net.ipv4.ip_local_port_range=10240 65000' in lines


def test_worker_processes_run_as_the_worker_user(host):
    # the default scenario's host also runs `flowworker monitor`, as its own user
    procs = [p for p in host.process.filter(comm='flowworker') if ' monitor ' not in p.args]
    assert procs
    assert {p.user for p in procs} == {'arq-worker'}


def test_a_demo_flow_is_completed_and_recorded(host):
    out = host.check_output(
        shlex.join(
            [
                f'{VENV}/bin/flowworker',
                'enqueue',
                'demo.echo',
                '--params',
                json.dumps({'hello': 'molecule'}),
                '--env-file',
                ENV_FILE,
            ]
        )
    )
    job_id = out.split()[-1]
    status = wait_for(
        lambda: psql(host, f"SELECT status FROM flow_tasks WHERE job_id = '{job_id}'") == 'succeeded',
        timeout=30,
    )
    assert status, psql(host, f"SELECT status, worker_id, error FROM flow_tasks WHERE job_id = '{job_id}'")
    assert int(redis(host, 'ZCARD', 'arq:queue:default')) == 0


def test_the_prune_timer_prunes_the_records_as_the_schema_owner(host):
    timer = host.service('arq-worker-prune.timer')
    assert timer.is_enabled
    assert timer.is_running
    settings = host.file('/etc/arq-worker/prune.env')
    assert (settings.user, settings.group, settings.mode) == ('root', 'root', 0o600)
    assert settings.contains('^DATABASE_URL=postgresql://flow_owner:')
    unit = host.file('/etc/systemd/system/arq-worker-prune.service')
    assert unit.contains('^ExecStart=/opt/arq-worker/current/bin/flowworker db prune --older-than 30d ')
    assert unit.contains('^User=arq-worker$')

    host.check_output('systemctl start arq-worker-prune.service')
    log = host.check_output('journalctl --unit arq-worker-prune.service --no-pager --output cat')
    assert 'pruned 0 jobs (0 attempts) finished before ' in log
