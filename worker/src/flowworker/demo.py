"""Built-in demo flows for smoke tests, the lab fleet and benchmarks."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field

from .registry import flow


class DemoFailure(RuntimeError):
    pass


@flow('demo.echo')
async def echo(**params: Any) -> dict[str, Any]:
    """Return the params it was given; with none it is a no-op."""
    return params


@flow('demo.sleep')
async def sleep(seconds: float = Field(default=1.0, ge=0)) -> dict[str, float]:
    """Wait ``seconds`` without using CPU."""
    await asyncio.sleep(seconds)
    return {'slept': seconds}


@flow('demo.fail')
async def fail(message: str = 'demo.fail always fails') -> None:
    """Raise an error, to show how a failed task is recorded."""
    raise DemoFailure(message)


def _sum_of_squares(n: int) -> int:
    return sum(i * i for i in range(n))


@flow('demo.cpu')
async def cpu(n: int = Field(default=100_000, ge=0)) -> dict[str, int]:
    """Burn CPU in a thread (the event loop keeps serving heartbeats): the sum of squares below ``n``."""
    return {'n': n, 'sum': await asyncio.to_thread(_sum_of_squares, n)}
