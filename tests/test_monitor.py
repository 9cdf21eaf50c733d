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


def prometheus_query(query: str) -> list[dict[str, Any]]:
    """The result of an instant query to the Prometheus running on the lab's Prometheus host."""
    url = PROMETHEUS_API + 'query?' + urllib.parse.urlencode({'query': query})
    read = f'import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())'
    result: list[dict[str, Any]] = json.loads(podman_exec(PROMETHEUS_HOST, 'python3', '-c', read))['data'][
        'result'
    ]
    return result


@pytest.fixture
def prometheus(deployed: Lab) -> Iterator[None]:
    """Debian's Prometheus on the lab's Prometheus host, scraping every second with the shipped
    flowworker-workers job (its file_sd_configs read what the roles wrote)."""
    if PROMETHEUS is None:
        pytest.fail("Debian's prometheus is not installed (make bootstrap installs it)")
    shipped = yaml.safe_load((ROOT / 'monitoring' / 'prometheus.yml').read_text())
    [job] = [job for job in shipped['scrape_configs'] if job['job_name'] == 'flowworker-workers']
    config = {'global': {'scrape_interval': '1s'}, 'scrape_configs': [job]}
    subprocess.run(['podman', 'cp', PROMETHEUS, f'{PROMETHEUS_HOST}:/usr/local/bin/prometheus'], check=True)
    podman_exec(PROMETHEUS_HOST, 'mkdir', '-p', PROMETHEUS_DIR)
    subprocess.run(
        ['podman', 'exec', '-i', PROMETHEUS_HOST, 'sh', '-c', f'cat > {PROMETHEUS_DIR}/prometheus.yml'],
        input=yaml.safe_dump(config),
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

    deadline = time.monotonic() + 60
    up: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            up = {
                s['metric']['instance']: s['value'][1]
                for s in prometheus_query('up{job="flowworker-workers"}')
            }
        except (subprocess.CalledProcessError, json.JSONDecodeError):
            up = {}  # Prometheus still starting
        if up == dict.fromkeys(expected, '1'):
            break
        time.sleep(1)
    assert up == dict.fromkeys(expected, '1')

    # each process's own series, labelled by its instance and by the labels its target carries
    series = {s['metric']['instance']: s for s in prometheus_query('flowworker_max_jobs')}
    assert set(series) == expected
    beats = deployed.heartbeats()
    for instance, sample in series.items():
        host, port = instance.split(':')
        n = int(port) - METRICS_PORT
        assert sample['metric']['host'] == host
        assert sample['metric']['unit'] == f'arq-worker@{n}.service'
        assert sample['metric']['worker_id'] == f'{host}:arq-worker@{n}'
        assert sample['value'][1] == str(beats[f'arq:worker:{host}:arq-worker@{n}']['max_jobs'])
