"""Flows the tests deploy the way a team deploys its own: a module named in FLOWWORKER_FLOW_MODULES."""

from __future__ import annotations

import asyncio

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
