"""Flows the tests deploy the way a team deploys its own: a module named in FLOWWORKER_FLOW_MODULES."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flowworker import Retry, current_job, flow


@flow('test.slow', timeout=0.5)
async def slow(seconds: float = 5) -> None:
    """Always outlives its 0.5 s timeout."""
    await asyncio.sleep(seconds)


@flow('test.slow_once', timeout=0.5)
async def slow_once() -> int:
    """Times out on its first attempt only."""
    if current_job().attempt == 1:
        await asyncio.sleep(5)
    return current_job().attempt


@flow('test.flaky')
async def flaky(succeed_on: int) -> int:
    """Asks for a retry until attempt ``succeed_on``."""
    attempt = current_job().attempt
    if attempt < succeed_on:
        raise Retry(defer=0.05)
    return attempt


@flow('test.hold')
async def hold(path: str, fail: str | None = None) -> dict[str, int]:
    """Counts its runs in ``<path>.runs``, then once the file ``path`` exists returns, or raises
    ValueError(``fail``)."""
    runs = Path(path + '.runs')
    with runs.open('a') as f:
        f.write('run\n')
    while not Path(path).exists():
        await asyncio.sleep(0.01)
    if fail is not None:
        raise ValueError(fail)
    return {'runs': len(runs.read_text().splitlines())}
