"""The bench's flow (``FLOWWORKER_FLOW_MODULES=bench.flows``): the one INCR every peer's job makes."""

from __future__ import annotations

from flowworker import flow

from .peers import incr_async


@flow('bench.incr')
async def incr() -> None:
    await incr_async()
