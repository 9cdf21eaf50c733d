"""The lab fleet for end-to-end tests: made from nothing once per session, deployed by the tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / 'inventories' / 'lab'
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


@pytest.fixture(scope='session')
def lab() -> Iterator[Lab]:
    """The lab fleet, made anew: containers from the image, nothing deployed yet."""
    down = ansible_playbook(LAB, 'playbooks/lab.yml', '-e', 'lab_fleet_state=absent')
    assert down.returncode == 0, down.output
    up = ansible_playbook(LAB, 'playbooks/lab.yml')
    assert up.returncode == 0, up.output
    yield Lab(LAB)
    ansible_playbook(LAB, 'playbooks/lab.yml', '-e', 'lab_fleet_state=absent')
