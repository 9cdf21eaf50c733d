"""The monitoring service (arq_monitor): a sandboxed systemd service of its own user, answering."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from conftest import SCENARIO, exposure, heartbeats, wait_for

pytestmark = pytest.mark.skipif(SCENARIO != 'default', reason='the default scenario runs the monitor')

URL = 'http://127.0.0.1:8080'
ENV_FILE = '/etc/arq-monitor/monitor.env'


def get(host, path: str, method: str = 'GET') -> tuple[int, str]:
    """(status, body) of a request made on the host itself (the service listens on its loopback)."""
    code = (
        'import sys, urllib.request, urllib.error\n'
        'request = urllib.request.Request(sys.argv[1], method=sys.argv[2])\n'
        'try:\n'
        '    response = urllib.request.urlopen(request, timeout=30)\n'
        'except urllib.error.HTTPError as e:\n'
        '    response = e\n'
        'print(response.status)\n'
        'print(response.read().decode())\n'
    )
    out = host.check_output(shlex.join(['python3', '-c', code, URL + path, method]))
    status, _, body = out.partition('\n')
    return int(status), body


def test_the_service_is_enabled_and_running(host):
    service = host.service('arq-monitor.service')
    assert service.is_enabled
    assert service.is_running


def test_it_runs_as_its_own_user_without_a_login_shell(host):
    user = host.user('arq-monitor')
    assert user.shell == '/usr/sbin/nologin'
    assert user.group == 'arq-monitor'
    assert 'arq-worker' not in user.groups
    pid = host.check_output('systemctl show --property=MainPID --value arq-monitor.service')
    assert host.check_output(f'ps -o user= -p {pid}') == 'arq-monitor'


def test_the_env_file_is_private_to_the_monitor_group(host):
    env = host.file(ENV_FILE)
    assert (env.mode, env.user, env.group) == (0o640, 'root', 'arq-monitor')
    assert env.contains('^MONITOR_TOKEN=monitor-test-token-0123456789$')
    assert host.run(f'sudo -u arq-worker cat {ENV_FILE}').rc != 0


def test_the_unit_is_sandboxed_and_restarts_on_failure(host):
    unit = host.file('/etc/systemd/system/arq-monitor.service').content_string
    for line in (
        'Restart=on-failure',
        'NoNewPrivileges=yes',
        'ProtectSystem=strict',
        'ProtectHome=yes',
        'PrivateTmp=yes',
        'CapabilityBoundingSet=',
        f'ExecStart=/opt/arq-monitor/current/bin/flowworker monitor --host 127.0.0.1 --port 8080 --env-file {ENV_FILE}',
    ):
        assert line in unit.splitlines(), line
    assert host.run('systemd-analyze verify /etc/systemd/system/arq-monitor.service').rc == 0


def test_the_unit_is_exposed_at_most_2_of_10(host):
    assert exposure(host, 'arq-monitor.service') <= 2.0


def test_its_own_virtualenv_has_the_monitor_extra(host):
    current = host.file('/opt/arq-monitor/current')
    assert current.linked_to.startswith('/opt/arq-monitor/versions/flowworker-')
    assert (
        host.run('/opt/arq-monitor/current/bin/python -c "import fastapi, uvicorn, prometheus_client"').rc
        == 0
    )
    # the workers' virtualenv stays without the web stack
    assert host.run('/opt/arq-worker/current/bin/python -c "import fastapi"').rc != 0


def test_healthz_answers_200(host):
    assert get(host, '/healthz') == (200, '{"status":"ok"}')


def test_the_api_lists_the_workers_heartbeats(host):
    status, body = get(host, '/api/v1/task_queue/workers')
    assert status == 200
    json.loads(body)
    listed = set(re.findall(r'[\w.-]+:arq-worker@\d+', body))
    assert listed == set(wait_for(lambda: heartbeats(host)))


def test_cancel_without_the_token_is_refused(host):
    status, _ = get(host, '/api/v1/task_queue/tasks/no-such-job/cancel', method='POST')
    assert status == 401
