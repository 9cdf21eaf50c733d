"""Two wheelhouse builds of one commit are identical and hold the lock's versions; its hashes are checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..conftest import ROOT
from .test_lock import pins

LOCK = ROOT / 'worker' / 'requirements.lock'


def build(out: Path, lock: Path = LOCK) -> dict[str, Any]:
    """build_wheelhouse.py for the lab hosts' platform, with the monitor's extra, as the roles run it."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / 'roles' / 'flowworker_install' / 'files' / 'build_wheelhouse.py'),
            '--out',
            str(out),
            '--python-version',
            '3.11.2',
            '--arch',
            'x86_64',
            '--constraint',
            str(lock),
            '--extra',
            'monitor',
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


def test_a_file_whose_hash_the_lock_does_not_list_fails_the_build(tmp_path: Path) -> None:
    lock = tmp_path / 'requirements.lock'
    block = re.compile(r'(?ms)^typing-extensions==.*?(?=^\S)')
    zeroed = block.sub(lambda m: re.sub(r'sha256:[0-9a-f]{64}', 'sha256:' + '0' * 64, m[0]), LOCK.read_text())
    assert zeroed != LOCK.read_text()
    lock.write_text(zeroed)
    with pytest.raises(subprocess.CalledProcessError) as failed:
        build(tmp_path / 'wheelhouse', lock)
    assert 'DO NOT MATCH THE HASHES' in failed.value.stderr
    assert 'typing' in failed.value.stderr
    assert not (tmp_path / 'wheelhouse').exists()
