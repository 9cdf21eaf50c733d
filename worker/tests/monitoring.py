"""For the monitoring tests: ``flowworker monitor`` as a real subprocess, and a known mix of jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import httpx

from .servers import WORKER_ROOT, WorkerProcess, free_port, wait_until

if TYPE_CHECKING:
    from .conftest import Stack

TOKEN = 'test-token-0123456789abcdef'


class MonitorProcess:
    COMMAND = (sys.executable, '-m', 'flowworker', 'monitor')

    def __init__(self, env: dict[str, str], logs: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log = logs / f'monitor-{self.port}.log'
        self._file = self.log.open('wb')
        self.process = subprocess.Popen(
            [*self.COMMAND, '--port', str(self.port), *args],
            env={**os.environ, 'LOG_LEVEL': 'INFO', **env},
            stdout=self._file,
            stderr=subprocess.STDOUT,
            cwd=WORKER_ROOT,
        )
        wait_until(self._answers, 60, f'flowworker monitor on port {self.port}')

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f'flowworker monitor exited {self.process.returncode}:\n{self.output()}')
        try:
            httpx.get(f'{self.url}/healthz', timeout=10)
        except httpx.TransportError:
            return False
        return True

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {'Authorization': f'Bearer {token}'} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            self._file.close()

    def __enter__(self) -> MonitorProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class Mix:
    """A known fleet: one worker (one slot), 3 succeeded, 2 failed, 1 running and 2 queued jobs."""

    worker: WorkerProcess
    succeeded: list[str]
    failed: list[str]
    running: str
    queued: list[str]

    @property
    def recorded(self) -> list[str]:
        return [*self.succeeded, *self.failed, self.running]


async def known_mix(stack: Stack) -> Mix:
    worker = await stack.start_worker('--max-jobs', '1')
    succeeded = [await stack.enqueue('demo.echo', {'n': n}) for n in range(3)]
    failed = [await stack.enqueue('demo.fail') for _ in range(2)]
    await stack.wait_final([*succeeded, *failed])
    running = await stack.enqueue('demo.sleep', {'seconds': 120})
    await stack.wait_for(lambda: stack.attempts(running), 30, 'the sleep job to start')
    queued = [await stack.enqueue('demo.echo') for _ in range(2)]

    async def counted() -> bool:
        beat = await stack.redis.get(f'arq:worker:{worker.worker_id}')
        jobs = json.loads(beat)['jobs'] if beat else {}
        return bool(jobs == {'running': 1, 'completed': 3, 'failed': 2, 'retried': 0})

    await stack.wait_for(counted, 30, 'the heartbeat to count the jobs', alive=worker)
    return Mix(worker, succeeded, failed, running, queued)
