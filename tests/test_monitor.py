"""The monitoring service in the lab: deployed on lab-db by deploy.yml, reached through its published port.

It must show exactly the lab's worker processes (their heartbeats), count them in /metrics, refuse
a cancel without the token, and `make demo` (playbooks/demo.yml) must end with its URL. And a real
Prometheus (Debian's, run on the lab's Prometheus host with monitoring/prometheus.yml's job) must
scrape every worker process by the targets the roles wrote there, each series labelled by instance.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    LAB,
    METRICS_PORT,
    PROMETHEUS_HOST,
    ROOT,
    WORKERS,
    Lab,
    ansible_playbook,
    podman_exec,
    scrape_targets,
)

# lab-db publishes the monitor's port 8080 here (inventories/lab/host_vars/lab-db.yml)
MONITOR = 'http://127.0.0.1:42480'
WORKER_ID = re.compile(r'lab-worker-\d+:arq-worker@\d+')
# arq_monitor_read_token of inventories/lab/group_vars/all/stack.yml
READ_TOKEN = 'lab-monitor-read-token-not-secret'


def get(path: str, token: str | None = READ_TOKEN) -> httpx.Response:
    headers = {'Authorization': f'Bearer {token}'} if token else {}
    return httpx.get(MONITOR + path, headers=headers, timeout=30)


def test_the_api_lists_exactly_the_labs_worker_processes(deployed: Lab) -> None:
    assert get('/api/v1/task_queue/workers', token=None).status_code == 401
    assert get('/healthz', token=None).status_code == 200
    response = get('/api/v1/task_queue/workers')
    assert response.status_code == 200
    listed = set(WORKER_ID.findall(response.text))
    beating = {key.removeprefix('arq:worker:') for key in deployed.heartbeats()}
    assert listed == beating
    assert len(listed) == sum(WORKERS.values())


def test_the_workers_page_shows_every_worker_process(deployed: Lab) -> None:
    response = get('/workers')
    assert response.status_code == 200
    assert response.headers['content-type'].startswith('text/html')
    assert set(WORKER_ID.findall(response.text)) == {
        f'{host}:arq-worker@{n}' for host, count in WORKERS.items() for n in range(1, count + 1)
    }


def test_metrics_count_the_worker_processes(deployed: Lab) -> None:
    response = get('/metrics')
    assert response.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    # one sample per queue and state (running, draining): together every live process
    assert sum(sample.value for sample in families['flowworker_workers'].samples) == sum(WORKERS.values())


def test_cancel_without_the_token_is_refused(deployed: Lab) -> None:
    response = httpx.post(f'{MONITOR}/api/v1/task_queue/tasks/no-such-job/cancel', timeout=30)
    assert response.status_code == 401
    wrong = httpx.post(
        f'{MONITOR}/api/v1/task_queue/tasks/no-such-job/cancel',
        headers={'Authorization': 'Bearer not-the-lab-token-at-all'},
        timeout=30,
    )
    assert wrong.status_code in {401, 403}


def test_the_demo_ends_with_the_monitors_url(deployed: Lab) -> None:
    run = ansible_playbook(LAB, 'playbooks/demo.yml', '-e', 'demo_jobs=5')
    assert run.returncode == 0, run.output[-3000:]
    assert f'{MONITOR}/workers' in run.output.rsplit('TASK [', 1)[1]


def test_a_short_token_fails_before_any_host_changes(deployed: Lab, tmp_path: Path) -> None:
    bad = deployed.copy(tmp_path / 'inventory')
    bad.set_vars('group_vars/arq_monitors.yml', {'arq_monitor_token': 'hunter2'})

    run = bad.deploy()

    assert run.returncode != 0
    assert 'arq_monitor_token must be at least 16 characters' in run.output
    assert 'hunter2' not in run.output
    assert run.changed_hosts() == set(), run.output[-5000:]


PROMETHEUS = shutil.which('prometheus')
PROMETHEUS_DIR = '/tmp/prometheus-test'
PROMETHEUS_API = 'http://127.0.0.1:9090/api/v1/'
MONITORING = ROOT / 'monitoring'


def prometheus_api(path: str) -> dict[str, Any]:
    """The data of a successful answer of the Prometheus running on the lab's Prometheus host
    (an error answer fails the test with its message)."""
    read = (
        'import sys, urllib.error, urllib.request\n'
        'try: print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n'
        'except urllib.error.HTTPError as e: print(e.read().decode())'
    )
    answer = json.loads(podman_exec(PROMETHEUS_HOST, 'python3', '-c', read, PROMETHEUS_API + path))
    assert answer['status'] == 'success', (path, answer)
    data: dict[str, Any] = answer['data']
    return data


def prometheus_query(query: str) -> list[dict[str, Any]]:
    """The result of an instant query."""
    result: list[dict[str, Any]] = prometheus_api('query?' + urllib.parse.urlencode({'query': query}))[
        'result'
    ]
    return result


@pytest.fixture
def prometheus(deployed: Lab) -> Iterator[None]:
    """Debian's Prometheus on the lab's Prometheus host, scraping every second with the jobs of
    monitoring/prometheus.yml: flowworker-workers as shipped (its file_sd_configs read what the
    roles wrote), flowworker-monitor at the lab's monitor with its read token; and the alert rules."""
    if PROMETHEUS is None:
        pytest.fail("Debian's prometheus is not installed (make bootstrap installs it)")
    shipped = yaml.safe_load((MONITORING / 'prometheus.yml').read_text())
    jobs = {job['job_name']: job for job in shipped['scrape_configs']}
    jobs['flowworker-monitor']['static_configs'] = [{'targets': [f'{PROMETHEUS_HOST}:8080']}]
    jobs['flowworker-monitor']['authorization']['credentials_file'] = f'{PROMETHEUS_DIR}/monitor-token'
    files = {
        'prometheus.yml': yaml.safe_dump(
            {**shipped, 'global': {'scrape_interval': '1s', 'evaluation_interval': '1s'}}
        ),
        'alerts.yml': (MONITORING / 'alerts.yml').read_text(),
        'monitor-token': READ_TOKEN,
    }
    subprocess.run(['podman', 'cp', PROMETHEUS, f'{PROMETHEUS_HOST}:/usr/local/bin/prometheus'], check=True)
    podman_exec(PROMETHEUS_HOST, 'mkdir', '-p', PROMETHEUS_DIR)
    for name, content in files.items():
        subprocess.run(
            ['podman', 'exec', '-i', PROMETHEUS_HOST, 'sh', '-c', f'cat > {PROMETHEUS_DIR}/{name}'],
            input=content,
            text=True,
            check=True,
        )
    subprocess.run(
        [
            'podman', 'exec', '-d', PROMETHEUS_HOST, '/usr/local/bin/prometheus',
            f'--config.file={PROMETHEUS_DIR}/prometheus.yml',
            f'--storage.tsdb.path={PROMETHEUS_DIR}/data',
            '--web.listen-address=127.0.0.1:9090',
        ],
        check=True,
    )  # fmt: skip
    try:
        yield
    finally:
        podman_exec(PROMETHEUS_HOST, 'pkill', '-x', 'prometheus', check=False)
        podman_exec(PROMETHEUS_HOST, 'rm', '-rf', PROMETHEUS_DIR, '/usr/local/bin/prometheus', check=False)


def test_prometheus_scrapes_every_worker_process_by_the_targets_the_roles_wrote(
    deployed: Lab, prometheus: None
) -> None:
    expected = {f'{host}:{METRICS_PORT + n}' for host, count in WORKERS.items() for n in range(1, count + 1)}
    written = {target for host in WORKERS for entry in scrape_targets(host) for target in entry['targets']}
    assert written == expected
    targets = {f'{PROMETHEUS_HOST}:8080': 'flowworker-monitor'} | dict.fromkeys(
        expected, 'flowworker-workers'
    )

    deadline = time.monotonic() + 60
    up: dict[str, tuple[str, str]] = {}
    while time.monotonic() < deadline:
        try:
            up = {
                s['metric']['instance']: (s['metric']['job'], s['value'][1]) for s in prometheus_query('up')
            }
        except (subprocess.CalledProcessError, json.JSONDecodeError):
            up = {}  # Prometheus still starting
        if up == {instance: (job, '1') for instance, job in targets.items()}:
            break
        time.sleep(1)
    assert up == {instance: (job, '1') for instance, job in targets.items()}

    # each process says who it is: the port of instance N of a host is that host's arq-worker@N
    info = {s['metric']['instance']: s['metric'] for s in prometheus_query('flowworker_worker_info')}
    assert set(info) == expected
    beats = deployed.heartbeats()
    for instance, labels in info.items():
        host, port = instance.split(':')
        n = int(port) - METRICS_PORT
        assert (labels['host'], labels['unit']) == (host, f'arq-worker@{n}.service')
        assert labels['worker_id'] == f'{host}:arq-worker@{n}'
        assert f'arq:worker:{labels["worker_id"]}' in beats
    max_jobs = {s['metric']['instance']: s['value'][1] for s in prometheus_query('flowworker_max_jobs')}
    assert max_jobs == {i: str(beats[f'arq:worker:{info[i]["worker_id"]}']['max_jobs']) for i in expected}

    # every query of the dashboard and every alert rule evaluates against the real series
    dashboard = json.loads((MONITORING / 'dashboard.json').read_text())
    for panel in dashboard['panels']:
        for target in panel['targets']:
            # an answer other than success fails in prometheus_api, naming the query
            prometheus_query(target['expr'].replace('$queue', '.*').replace('$__rate_interval', '1m'))
    assert prometheus_query('sum(flowworker_queue_length)'), 'the monitor is scraped'
    shipped = yaml.safe_load((MONITORING / 'alerts.yml').read_text())
    loaded = prometheus_api('rules')['groups']
    assert [(rule['name'], rule['health']) for group in loaded for rule in group['rules']] == [
        (rule['alert'], 'ok') for group in shipped['groups'] for rule in group['rules']
    ], loaded
