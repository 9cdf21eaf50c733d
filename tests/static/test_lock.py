"""worker/requirements.lock pins every dependency of worker/pyproject.toml at the version it names, hashed."""

from __future__ import annotations

import re
import tomllib

from ..conftest import ROOT


def pins(lines: list[str]) -> dict[str, str]:
    """``name==version`` requirements (a marker or extras aside), by normalised name."""
    found = {}
    for line in lines:
        match = re.match(r'^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)', line)
        if match:
            found[re.sub(r'[-_.]+', '-', match[1]).lower()] = match[3]
    return found


def test_the_lock_holds_every_pin_of_the_project_at_its_version() -> None:
    project = tomllib.loads((ROOT / 'worker' / 'pyproject.toml').read_text())['project']
    declared = pins(
        project['dependencies'] + [r for extra in project['optional-dependencies'].values() for r in extra]
    )
    lock = (ROOT / 'worker' / 'requirements.lock').read_text()
    locked = pins(lock.splitlines())
    assert declared, 'pyproject.toml pins nothing'
    assert {name: locked.get(name) for name in declared} == declared, 'run make lock'
    # the lock is the whole tree: more than the direct dependencies, every one pinned exactly
    assert len(locked) > len(declared)
    entries = re.findall(r'(?m)^[A-Za-z0-9].*\n(?:[ \t]+.*\n)*', lock)
    assert [e.split()[0] for e in entries if not re.match(r'[A-Za-z0-9._-]+==\S', e)] == []
    # and each with the hashes pip checks the downloaded files against
    assert [e.split()[0] for e in entries if not re.search(r'--hash=sha256:[0-9a-f]{64}', e)] == []
