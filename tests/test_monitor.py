"""The monitoring service in the lab: deployed on lab-db by deploy.yml, reached through its published port.

It must show exactly the lab's worker processes (their heartbeats), count them in /metrics, refuse
a cancel without the token, and `make demo` (playbooks/demo.yml) must end with its URL.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import LAB, WORKERS, Lab, ansible_playbook

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
