"""supervisor: one [program:] per process in group arq-worker, the guide's names and settings."""

from __future__ import annotations

import pytest
from conftest import METRICS_PORT, SCENARIO, heartbeats, metrics

pytestmark = pytest.mark.skipif(SCENARIO != 'supervisor', reason='supervisor scenario only')

NAMES = [f'arq-worker_{n:02d}' for n in range(1, 4)]


def status(host) -> dict[str, list[str]]:
    out = host.run('supervisorctl status').stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


def test_supervisorctl_shows_the_guides_names(host):
    procs = status(host)
    assert sorted(procs) == [f'arq-worker:{name}' for name in NAMES]
    assert all(fields[0] == 'RUNNING' for fields in procs.values()), procs


def test_group_start_star_works(host):
    assert host.run('supervisorctl start "arq-worker:*"').rc == 0


def test_program_has_the_guides_settings(host):
    conf = host.file('/etc/supervisor/conf.d/arq-worker_01.conf')
    lines = conf.content_string.splitlines()
    assert lines[0].startswith('; ')
    for line in (
        '[program:arq-worker_01]',
        'autostart=true',
        'autorestart=true',
        'startsecs=10',
        'startretries=3',
        'exitcodes=0,2',
        'stopsignal=TERM',
        'stopwaitsecs=40',
        'killasgroup=false',
        'priority=999',
        'redirect_stderr=false',
        'stdout_logfile=/var/log/arq-worker/arq-worker_01.log',
        'stdout_logfile_maxbytes=50MB',
        'stdout_logfile_backups=10',
        'stdout_capture_maxbytes=1MB',
        'stderr_logfile=/var/log/arq-worker/arq-worker_01-error.log',
        'stderr_logfile_maxbytes=50MB',
        'stderr_logfile_backups=10',
        'stderr_capture_maxbytes=1MB',
        'user=arq-worker',
    ):
        assert line in lines, line
    group = host.file('/etc/supervisor/conf.d/arq-worker.conf').content_string
    assert 'programs=arq-worker_01,arq-worker_02,arq-worker_03' in group.splitlines()


def test_one_heartbeat_per_process(host, hostname):
    beats = heartbeats(host)
    assert sorted(beats) == sorted(f'{hostname}:{name}' for name in NAMES)
    procs = status(host)
    for name in NAMES:
        pid = int(procs[f'arq-worker:{name}'][2].rstrip(','))
        assert beats[f'{hostname}:{name}']['pid'] == pid
        assert beats[f'{hostname}:{name}']['state'] == 'running'


@pytest.mark.parametrize('n', range(1, len(NAMES) + 1))
def test_each_program_serves_its_metrics_on_its_own_port(host, hostname, n):
    served = metrics(host, METRICS_PORT + n)
    assert f'worker_id="{hostname}:arq-worker_{n:02d}"' in served
    assert 'flowworker_max_jobs ' in served
