"""Helpers for the testinfra checks of the arq_worker scenarios (hosts: podman://<instance>)."""

from __future__ import annotations

import json
import os
import re
import shlex
import time

import pytest

REDIS_PASSWORD = 'redis-test-password'  # the admin user's (shared/group_vars/all/main.yml)
OWNER_DSN = 'postgresql://flow_owner:owner-test-password@127.0.0.1:5432/flows'
VENV = '/opt/arq-worker/current'
ENV_FILE = '/etc/arq-worker/worker.env'

SCENARIO = os.environ.get('MOLECULE_SCENARIO_NAME', 'default')


def redis(host, *args: str) -> str:
    cmd = ['redis-cli', '--user', 'admin', '-a', REDIS_PASSWORD, '--no-auth-warning', *args]
    return host.check_output(shlex.join(cmd))


def heartbeats(host) -> dict[str, dict]:
    keys = [k for k in redis(host, '--scan', '--pattern', 'arq:worker:*').splitlines() if k]
    out = {}
    for key in keys:
        raw = redis(host, 'GET', key)
        if raw:
            out[key.removeprefix('arq:worker:')] = json.loads(raw)
    return out


def psql(host, sql: str) -> str:
    return host.check_output(shlex.join(['psql', OWNER_DSN, '-Atc', sql]))


def wait_for(predicate, timeout: float = 30, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# the role's arq_worker_metrics_port: instance N of the default pool serves its metrics on + N
METRICS_PORT = 9300


def metrics(host, port: int) -> str:
    """The Prometheus text a worker process serves on the host's port ``port``."""
    read = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    return host.check_output(shlex.join(['python3', '-c', read]))


def exposure(host, unit: str) -> float:
    """``systemd-analyze security``'s overall exposure of ``unit`` (0 safest, 10 unsafe)."""
    last = host.check_output(f'systemd-analyze security --no-pager {shlex.quote(unit)}').splitlines()[-1]
    match = re.search(r'exposure level for \S+: ([0-9.]+)', last)
    assert match, last
    return float(match[1])


@pytest.fixture
def hostname(host) -> str:
    # The worker ids use the inventory name, which molecule sets to the container name.
    return host.backend.name
