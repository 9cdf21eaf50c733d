"""The lab fleet for end-to-end tests: made from nothing once per session, deployed by the tests."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / 'inventories' / 'lab'
# the ports lab-db publishes on the controller's loopback (inventories/lab/host_vars/lab-db.yml)
REDIS_PORT, POSTGRESQL_PORT = 42379, 42432
WORKERS = {'lab-worker-1': 3, 'lab-worker-2': 2}
RECAP = re.compile(
    r'^(?P<host>\S+)\s+: ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)'
    r'\s+failed=(?P<failed>\d+)',
    re.MULTILINE,
)


@dataclass
class Run:
    returncode: int
    output: str

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP per host: ok, changed, unreachable, failed."""
        return {
            m['host']: {k: int(v) for k, v in m.groupdict().items() if k != 'host'}
            for m in RECAP.finditer(self.output)
        }

    def changed_hosts(self) -> set[str]:
        return {host for host, counts in self.recap.items() if counts['changed']}


def ansible_playbook(inventory: Path, playbook: str, *args: str) -> Run:
    result = subprocess.run(
        ['ansible-playbook', '-i', str(inventory), playbook, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return Run(result.returncode, result.stdout + result.stderr)


@dataclass
class Lab:
    inventory: Path

    def vars(self, *path: str) -> dict[str, object]:
        data: dict[str, object] = yaml.safe_load(self.inventory.joinpath(*path).read_text())
        return data

    def deploy(self, *args: str) -> Run:
        return ansible_playbook(self.inventory, 'deploy.yml', *args)

    def copy(self, destination: Path) -> Lab:
        """A copy of the inventory (with the lab's key), to change without touching the real one."""
        shutil.copytree(self.inventory, destination)
        return Lab(destination)

    def set_vars(self, relative: str, values: dict[str, Any]) -> None:
        """Merge `values` into an inventory file (made if missing)."""
        path = self.inventory / relative
        current = yaml.safe_load(path.read_text()) if path.exists() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**(current or {}), **values}))

    def secret(self, name: str) -> str:
        return str(self.vars('group_vars', 'all', 'stack.yml')[name])

    def redis_url(self) -> str:
        return f'redis://:{self.secret("redis_server_password")}@127.0.0.1:{REDIS_PORT}/0'

    def worker_dsn(self) -> str:
        password = self.secret('postgresql_worker_password')
        return f'postgresql://flow_worker:{password}@127.0.0.1:{POSTGRESQL_PORT}/flows'

    def heartbeats(self) -> dict[str, dict[str, Any]]:
        """The live worker processes: heartbeat key → its JSON."""

        async def read() -> dict[str, dict[str, Any]]:
            client = redis.asyncio.Redis.from_url(self.redis_url(), decode_responses=True)
            try:
                keys = [key async for key in client.scan_iter('arq:worker:*')]
                return {key: json.loads(await client.get(key) or '{}') for key in keys}
            finally:
                await client.aclose()

        return asyncio.run(read())

    def pids(self, host: str) -> dict[str, int]:
        return {key: beat['pid'] for key, beat in self.heartbeats().items() if beat['host'] == host}


def assert_deployed(run: Run) -> None:
    assert run.returncode == 0, run.output[-5000:]
    assert set(run.recap) == {'lab-db', *WORKERS}
    assert not any(counts['failed'] or counts['unreachable'] for counts in run.recap.values())


def podman_exec(host: str, *argv: str, check: bool = True) -> str:
    """Run a command in a lab container; its stdout."""
    return subprocess.run(
        ['podman', 'exec', host, *argv], capture_output=True, text=True, check=check
    ).stdout.strip()


def current_version(host: str) -> str:
    """The worker version a host runs (the target of its `current` link)."""
    return podman_exec(host, 'readlink', '/opt/arq-worker/current')


@pytest.fixture(scope='session')
def lab() -> Iterator[Lab]:
    """The lab fleet, made anew: containers from the image, nothing deployed yet."""
    down = ansible_playbook(LAB, 'playbooks/lab.yml', '-e', 'lab_fleet_state=absent')
    assert down.returncode == 0, down.output
    up = ansible_playbook(LAB, 'playbooks/lab.yml')
    assert up.returncode == 0, up.output
    yield Lab(LAB)
    ansible_playbook(LAB, 'playbooks/lab.yml', '-e', 'lab_fleet_state=absent')


@pytest.fixture(scope='module')
def deployed(lab: Lab) -> Lab:
    """The lab with deploy.yml applied (a no-op when an earlier module deployed it)."""
    assert_deployed(lab.deploy())
    return lab
