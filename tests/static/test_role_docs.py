"""Every role's documentation agrees with its code: defaults, argument_specs, README, tags.

Static (no host): `make lint` runs it. STYLE: a README's variable table is checked against the
argument specs, not typed twice by hand, and it names no tag the tasks do not use.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..conftest import ROOT

ROLES = sorted(p.name for p in (ROOT / 'roles').iterdir() if (p / 'meta' / 'argument_specs.yml').exists())


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def options(role: str) -> dict[str, dict[str, Any]]:
    specs = load(ROOT / 'roles' / role / 'meta' / 'argument_specs.yml')['argument_specs']
    main: dict[str, dict[str, Any]] = specs['main']['options']
    return main


def section(role: str, title: str) -> str:
    readme = (ROOT / 'roles' / role / 'README.md').read_text()
    return readme.split(f'## {title}', 1)[1].split('\n## ', 1)[0]


@pytest.mark.parametrize('role', ROLES)
def test_argument_specs_have_every_default_with_its_value(role: str) -> None:
    defaults = load(ROOT / 'roles' / role / 'defaults' / 'main.yml')
    # a required parameter (what an including role passes) has no default
    assert sorted(name for name, option in options(role).items() if not option.get('required')) == sorted(
        defaults
    )
    for name, option in options(role).items():
        assert option.get('default') == defaults.get(name), name
        assert option.get('description'), name


@pytest.mark.parametrize('role', ROLES)
def test_the_readme_table_lists_every_variable_with_its_default(role: str) -> None:
    rows = dict(
        re.findall(r'^\| `(\w+)` \| (`.*?`|required) \|', section(role, 'Role Variables'), re.MULTILINE)
    )
    assert sorted(rows) == sorted(options(role))
    for name, option in options(role).items():
        if option.get('required'):
            assert rows[name] == 'required', name
        else:
            assert yaml.safe_load(rows[name].strip('`')) == option.get('default'), name


@pytest.mark.parametrize('role', ROLES)
def test_the_readme_tags_are_the_tags_the_tasks_use(role: str) -> None:
    used = {
        tag for task in load(ROOT / 'roles' / role / 'tasks' / 'main.yml') for tag in task.get('tags', [])
    }
    documented = set(re.findall(r'^\| `(\w+)` \|', section(role, 'Tags'), re.MULTILINE))
    assert documented - {'always'} == used - {'always'}


@pytest.mark.parametrize('role', ROLES)
def test_secrets_are_no_log(role: str) -> None:
    for name, option in options(role).items():
        if re.search(r'password|token|_url$', name):
            assert option.get('no_log') is True, name


def test_the_arq_worker_bad_input_catalogue_is_the_scenarios() -> None:
    cases = load(ROOT / 'molecule' / 'bad_inputs' / 'vars' / 'cases.yml')['bad_input_cases']
    catalogue = section('arq_worker', 'Bad inputs')
    for case in cases:
        for name in case['vars']:
            assert f'`{name}' in catalogue, name
