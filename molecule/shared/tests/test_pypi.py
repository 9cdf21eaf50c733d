"""pypi: flowworker from the scenario's package index at the pinned version, upgraded side by side."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import SCENARIO, VENV, heartbeats

pytestmark = pytest.mark.skipif(SCENARIO != 'pypi', reason='pypi scenario only')

# The first pinned version, and the one the side effect pinned next (molecule/pypi/host_vars).
HOST_VARS = yaml.safe_load((Path(__file__).parents[2] / 'pypi' / 'host_vars' / 'arq-pypi.yml').read_text())
PINNED = HOST_VARS['arq_worker_version']
UPGRADE = HOST_VARS['pypi_test_upgrade_version']
VERSIONS = '/opt/arq-worker/versions'


def installed_version(host, venv: str) -> str:
    code = "import importlib.metadata as m; print(m.version('flowworker'))"
    return host.check_output(shlex.join([f'{venv}/bin/python', '-c', code]))


def test_current_is_the_upgraded_pinned_version(host):
    assert host.file(VENV).linked_to.startswith(f'{VERSIONS}/flowworker-{UPGRADE}-')
    assert installed_version(host, VENV) == UPGRADE


def test_the_first_version_stays_beside_it(host):
    (first,) = host.check_output(f'ls -d {VERSIONS}/flowworker-{PINNED}-*').split()
    assert installed_version(host, first) == PINNED


def test_every_instance_runs_the_upgraded_version(host, hostname):
    beats = heartbeats(host)
    assert sorted(beats) == [f'{hostname}:arq-worker@{n}' for n in (1, 2)]
    assert {beat['version'] for beat in beats.values()} == {UPGRADE}


def test_the_wheels_came_from_the_index(host):
    served = host.check_output('journalctl --no-pager -o cat -u pypi-test-index.service')
    for version in (PINNED, UPGRADE):
        assert f'GET /simple/flowworker/flowworker-{version}-py3-none-any.whl' in served
    assert host.check_output('ls -A /opt/arq-worker/wheelhouse') == ''


def test_pip_settings_are_readable_by_root_only(host):
    conf = host.file('/etc/arq-worker/pip.conf')
    assert (conf.user, conf.group, conf.mode) == ('root', 'root', 0o600)
    lines = conf.content_string.splitlines()
    password = HOST_VARS['pypi_test_index_password']
    assert f'index-url = http://pypi-test:{password}@127.0.0.1:8080/simple/' in lines
    assert 'trusted-host = 127.0.0.1' in lines
    # the side effect's upgrade changed the options
    assert [f'{k} = {v}' for k, v in HOST_VARS['pypi_test_upgrade_pip_options'].items()] == [
        line for line in lines if line.startswith('timeout')
    ]


def pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a lock or constraints file, by normalised name."""
    found = re.findall(r'(?m)^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)', text)
    return {re.sub(r'[-_.]+', '-', name).lower(): version for name, version in found}


def test_the_dependencies_are_installed_at_the_versions_of_the_constraints(host):
    given = pins((Path(os.environ['MOLECULE_EPHEMERAL_DIRECTORY']) / 'constraints.txt').read_text())
    held, held_version = HOST_VARS['pypi_test_held'].split('==')
    locked = pins((Path(__file__).parents[3] / 'worker' / 'requirements.lock').read_text())
    # the index's newest is the lock's: without the constraints pip would take that one
    assert given[held] == held_version != locked[held]
    constraints = host.file('/etc/arq-worker/constraints.txt')
    assert (constraints.user, constraints.group, constraints.mode) == ('root', 'root', 0o644)
    assert pins(constraints.content_string) == given
    code = "import importlib.metadata as m; print('\\n'.join(f'{d.name}=={d.version}' for d in m.distributions()))"
    installed = pins(host.check_output(shlex.join([f'{VENV}/bin/python', '-c', code])))
    assert {'arq', 'redis', 'sqlalchemy', 'asyncpg', 'pydantic', held} <= installed.keys()
    assert {name: installed[name] for name in installed if name in given} == {
        name: given[name] for name in installed if name in given
    }
