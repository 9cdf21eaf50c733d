#!/usr/bin/env python3
"""Start one worker process: `python scripts/start_worker.py --max-jobs 5 --log-level DEBUG`.

The same entry as `flowworker worker`; runs from a checkout (with the dependencies installed)
as well as from an installed package.
"""

import sys
from pathlib import Path

try:
    import flowworker  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'src'))

from flowworker.cli import start_worker

if __name__ == '__main__':
    sys.exit(start_worker(prog='start_worker.py'))
