"""Bare arq workers for the throughput baseline: the same function name and job, no bookkeeping.

arq's CLI takes worker settings by dotted name: `python -m arq bench.bare.fast_poll`.
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings

from .peers import incr_async


async def run_flow(ctx: dict[str, Any], flow_name: str, params: dict[str, Any]) -> None:
    await incr_async()


default_poll: dict[str, Any] = {
    'functions': [run_flow],
    'queue_name': 'arq:queue:default',
    'redis_settings': RedisSettings.from_dsn(os.environ['REDIS_URL']),
    'max_jobs': int(os.environ['BENCH_MAX_JOBS']),
    'log_results': False,
}
fast_poll = {**default_poll, 'poll_delay': 0.01}
