"""The project's parts beside this collection in the repository, for the controller's plugins.

``urls``: flowworker's own URL check (``worker/src/flowworker/urls.py``); ``acl``: the Redis ACL
rules of its clients (``worker/src/flowworker/acl.py``). Both are standard library only and loaded
by path, so the roles run them on the controller before flowworker is installed anywhere.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[6]
ROLES = ROOT / 'roles'
SOURCE = ROOT / 'worker' / 'src' / 'flowworker'


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f'flowworker_fleet_{name}', SOURCE / f'{name}.py')
    if spec is None or spec.loader is None:
        raise ImportError(f'flowworker.{name} is not in {SOURCE}')
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


urls = _load('urls')
acl = _load('acl')
