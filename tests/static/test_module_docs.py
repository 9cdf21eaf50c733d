"""Every module's DOCUMENTATION (and its EXAMPLES and RETURN, where it has them) is YAML, as
ansible-doc and ansible-lint read it, and DOCUMENTATION's options are ones the module (or the action
plugin of its name) takes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
COLLECTION_MODULES = ROOT.glob('collections/ansible_collections/*/*/plugins/modules/*.py')
MODULES = sorted([*COLLECTION_MODULES, *ROOT.glob('roles/*/library/*.py')])


def blocks(path: Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    return {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ('DOCUMENTATION', 'EXAMPLES', 'RETURN')
        and isinstance(node.value, ast.Constant)
    }


@pytest.mark.parametrize('path', MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_documentation_is_yaml_and_names_the_options(path: Path) -> None:
    found = blocks(path)
    parsed = {name: yaml.safe_load(text) for name, text in found.items()}
    documented = parsed['DOCUMENTATION']
    # an action plugin of the same name takes the options of a module that only documents it
    action = path.parent.parent / 'action' / path.name
    source = path.read_text() + (action.read_text() if action.exists() else '')
    for option in documented.get('options') or {}:
        assert f"'{option}'" in source, f'{option} is documented but the module does not take it'
