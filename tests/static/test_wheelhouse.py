"""Two wheelhouse builds of one commit are identical, and hold the versions of the lock file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..conftest import ROOT
from .test_lock import pins

LOCK = ROOT / 'worker' / 'requirements.lock'


def build(out: Path) -> dict[str, Any]:
    """build_wheelhouse.py for the hosts' platform (make lock's), as the role runs it."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / 'roles' / 'arq_worker' / 'files' / 'build_wheelhouse.py'),
            '--out',
            str(out),
            '--python-version',
            '3.11.2',
            '--arch',
            'x86_64',
            '--constraint',
            str(LOCK),
            str(ROOT / 'worker'),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    built: dict[str, Any] = json.loads(result.stdout)
    return built


def test_two_builds_of_one_commit_are_identical_and_locked(tmp_path: Path) -> None:
    first = build(tmp_path / 'first' / 'wheelhouse')
    second = build(tmp_path / 'second' / 'wheelhouse')
    assert first['id'] == second['id']
    assert first['wheels'] == second['wheels']
    locked = pins(LOCK.read_text().splitlines())
    built = pins(
        ['=='.join(wheel.split('-')[:2]) for wheel in first['wheels'] if not wheel.startswith('flowworker-')]
    )
    assert built == {name: locked[name] for name in built}
