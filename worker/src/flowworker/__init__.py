"""flowworker: arq workers that run named flows from Redis queues and record every task in PostgreSQL."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import VERSION

if TYPE_CHECKING:
    from arq import Retry

    from .registry import flow
    from .runner import JobInfo, current_job

__version__ = VERSION
__all__ = ['JobInfo', 'Retry', '__version__', 'current_job', 'flow']

# Imported on first use: a command that needs Redis alone (`python -m flowworker.heartbeat_cli`,
# run by deploys on every host) does not load the worker's stack with the package.
_LAZY = {
    'Retry': 'arq',
    'flow': 'flowworker.registry',
    'JobInfo': 'flowworker.runner',
    'current_job': 'flowworker.runner',
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
