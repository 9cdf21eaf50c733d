"""``flowworker monitor`` as a real subprocess on a free port, and an HTTP client for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import httpx

from .servers import WORKER_ROOT, free_port, wait_until

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
