"""The ``/workers`` page as a browser renders it: headless Chromium (Debian's ``chromium``).

Screenshots (a phone and a desktop window) are saved in ``worker/build/test-output/``.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from flowworker.report import QUEUE_COLUMNS, WORKER_COLUMNS

from .conftest import Stack
from .monitoring import MonitorProcess, known_mix
from .servers import WORKER_ROOT

CHROMIUM = shutil.which('chromium')
OUTPUT = WORKER_ROOT / 'build' / 'test-output'
WINDOWS = {'phone': '390,844', 'desktop': '1280,800'}

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make bootstrap installs it)"
)


class Tables(HTMLParser):
    """The text of every cell of every table, by table id; and the page's meta tags."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.meta: dict[str, str] = {}
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == 'table':
            self._table = self.tables.setdefault(attributes.get('id') or '', [])
        elif tag == 'tr' and self._table is not None:
            self._table.append([])
        elif tag in {'td', 'th'}:
            self._cell = []
        elif tag == 'meta' and 'content' in attributes:
            name = attributes.get('name') or attributes.get('http-equiv') or ''
            self.meta[name] = attributes['content'] or ''

    def handle_endtag(self, tag: str) -> None:
        if tag in {'td', 'th'} and self._table is not None and self._cell is not None:
            self._table[-1].append(''.join(self._cell).strip())
            self._cell = None
        elif tag == 'table':
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def chromium(*args: str, profile: Path) -> str:
    assert CHROMIUM is not None
    result = subprocess.run(
        # --no-sandbox: the tests may run as root, where Chromium's sandbox refuses to start
        [
            CHROMIUM,
            '--headless',
            '--no-sandbox',
            '--disable-gpu',
            '--hide-scrollbars',
            f'--user-data-dir={profile}',
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


async def test_the_workers_page_renders_the_fleet_in_chromium(
    stack: Stack, monitor: MonitorProcess, tmp_path: Path
) -> None:
    mix = await known_mix(stack)
    other = await stack.start_worker('--queue-name', 'reports', '--max-jobs', '4')
    url = f'{monitor.url}/workers'

    page = Tables()
    page.feed(chromium('--dump-dom', url, profile=tmp_path / 'profile'))

    assert page.meta['viewport'] == 'width=device-width, initial-scale=1'
    assert page.meta['refresh'] == '5'
    header, *rows = page.tables['workers']
    assert header == list(WORKER_COLUMNS)
    assert [row[:7] for row in rows] == [
        [mix.worker.worker_id, socket.gethostname(), 'default', 'running', '1/1', '3', '2'],
        [other.worker_id, socket.gethostname(), 'reports', 'running', '0/4', '0', '0'],
    ]
    async with monitor.client() as client:
        workers = (await client.get('/api/v1/task_queue/workers')).json()['workers']
    assert [[w['worker_id'], w['host']] for w in workers] == [row[:2] for row in rows]
    assert all(row[7].endswith('s ago') for row in rows)
    assert page.tables['queues'] == [
        list(QUEUE_COLUMNS),
        ['default', '3', '2', page.tables['queues'][1][3], '0', '1', '1'],
        ['reports', '0', '0', '-', '0', '0', '1'],
    ]
    assert re.fullmatch(r'[0-9.]+s', page.tables['queues'][1][3])
    assert [row[:4] for row in page.tables['rates'][1:]] == [[w, '3', '2', '0'] for w in ('1m', '5m', '15m')]

    OUTPUT.mkdir(parents=True, exist_ok=True)
    for name, size in WINDOWS.items():
        screenshot = OUTPUT / f'workers-{name}.png'
        screenshot.unlink(missing_ok=True)
        chromium(f'--screenshot={screenshot}', f'--window-size={size}', url, profile=tmp_path / 'profile')
        assert screenshot.read_bytes().startswith(b'\x89PNG\r\n\x1a\n')
