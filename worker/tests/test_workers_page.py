"""The ``/workers`` page and a task's page as a browser renders them: headless Chromium (Debian's
``chromium``).

Screenshots of each (a phone and a desktop window) are saved in ``worker/build/test-output/``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest

from flowworker.report import ATTEMPT_COLUMNS, FAILURE_COLUMNS, QUEUE_COLUMNS, WORKER_COLUMNS

from .conftest import Stack
from .monitoring import MonitorProcess, known_mix
from .servers import WORKER_ROOT

CHROMIUM = shutil.which('chromium')
OUTPUT = WORKER_ROOT / 'build' / 'test-output'
WINDOWS = {'phone': '390,844', 'desktop': '1280,800'}
REPORTS = 'arq:queue:reports'
MARKUP = '<img src=x onerror="alert(1)">'
ODD_ID = 'job <b>&"odd"'
# the reports worker's heartbeat counts once it has run the retried job and the odd one
COUNTED = {'running': 0, 'completed': 1, 'failed': 1, 'retried': 1}

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make bootstrap installs it)"
)


@dataclass
class Chart:
    """An inline SVG chart: its attributes, its title (its accessible name) and its bars' counts."""

    attributes: dict[str, str]
    title: str = ''
    bars: dict[int, int] = field(default_factory=dict)


class Page(HTMLParser):
    """The text of every cell of every table and the links in them, by table id; the page's meta
    tags, charts (by id) and forms' fields."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.links: dict[str, list[str]] = {}
        self.meta: dict[str, str] = {}
        self.charts: dict[str, Chart] = {}
        self.forms: list[dict[str, str]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._chart: Chart | None = None
        self._title: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or '' for name, value in attrs}
        if tag == 'table':
            self._table = attributes.get('id', '')
            self.tables.setdefault(self._table, [])
        elif tag == 'tr' and self._table is not None:
            self.tables[self._table].append([])
        elif tag in {'td', 'th'}:
            self._cell = []
        elif tag == 'a' and self._table is not None:
            self.links.setdefault(self._table, []).append(attributes['href'])
        elif tag == 'meta' and 'content' in attributes:
            name = attributes.get('name') or attributes.get('http-equiv') or ''
            self.meta[name] = attributes['content']
        elif tag == 'svg':
            self._chart = self.charts.setdefault(attributes['id'], Chart(attributes))
        elif tag == 'title' and self._chart is not None and not self._chart.title:
            self._title = []
        elif tag == 'rect' and self._chart is not None:
            self._chart.bars[int(attributes['data-minutes-ago'])] = int(attributes['data-count'])
        elif tag == 'form':
            self.forms.append({'action': attributes['action'], 'method': attributes['method']})
        elif tag == 'input':
            self.forms[-1][attributes['name']] = attributes['type']

    def handle_endtag(self, tag: str) -> None:
        if tag in {'td', 'th'} and self._table is not None and self._cell is not None:
            self.tables[self._table][-1].append(''.join(self._cell).strip())
            self._cell = None
        elif tag == 'table':
            self._table = None
        elif tag == 'title' and self._chart is not None and self._title is not None:
            self._chart.title = ''.join(self._title)
            self._title = None
        elif tag == 'svg':
            self._chart = None

    def handle_data(self, data: str) -> None:
        for text in (self._cell, self._title):
            if text is not None:
                text.append(data)


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


def screenshots(name: str, url: str, profile: Path) -> None:
    """``url`` on a phone and on a desktop, as ``<name>-phone.png`` and ``<name>-desktop.png``."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for window, size in WINDOWS.items():
        screenshot = OUTPUT / f'{name}-{window}.png'
        screenshot.unlink(missing_ok=True)
        chromium(f'--screenshot={screenshot}', f'--window-size={size}', url, profile=profile)
        assert screenshot.read_bytes().startswith(b'\x89PNG\r\n\x1a\n')


def rendered(url: str, profile: Path) -> Page:
    page = Page()
    page.feed(chromium('--dump-dom', url, profile=profile))
    return page


async def test_the_workers_page_renders_the_fleet_in_chromium(
    stack: Stack, monitor: MonitorProcess, tmp_path: Path
) -> None:
    mix = await known_mix(stack)
    other = await stack.start_worker('--queue-name', 'reports', '--max-jobs', '4')
    job = await stack.arq.enqueue_job('run_flow', 'test.flaky', {'succeed_on': 2}, _queue_name=REPORTS)
    assert job is not None
    retried = job.job_id
    # a failure whose id and error are markup: the page shows them as text
    await stack.arq.enqueue_job(
        'run_flow', 'demo.fail', {'message': MARKUP}, _queue_name=REPORTS, _job_id=ODD_ID
    )
    await stack.wait_final([retried, ODD_ID])

    async def counted() -> bool:
        beat = await stack.redis.get(f'arq:worker:{other.worker_id}')
        return bool(beat and json.loads(beat)['jobs'] == COUNTED)

    await stack.wait_for(counted, 30, 'the heartbeat to count the reports jobs', alive=other)
    url = f'{monitor.url}/workers'

    page = rendered(url, tmp_path / 'profile')

    assert page.meta['viewport'] == 'width=device-width, initial-scale=1'
    assert page.meta['refresh'] == '5'
    header, *rows = page.tables['workers']
    assert header == list(WORKER_COLUMNS)
    assert [row[:7] for row in rows] == [
        [mix.worker.worker_id, socket.gethostname(), 'default', 'running', '1/1', '3', '2'],
        [other.worker_id, socket.gethostname(), 'reports', 'running', '0/4', '1', '1'],
    ]
    async with monitor.client() as client:
        workers = (await client.get('/api/v1/task_queue/workers')).json()['workers']
        unknown = await client.get('/tasks/no-such-job')
        raw = (await client.get('/workers')).text
        odd = await client.get(f'/tasks/{quote(ODD_ID, safe="")}')
    assert [[w['worker_id'], w['host']] for w in workers] == [row[:2] for row in rows]
    assert all(row[7].endswith('s ago') for row in rows)
    assert page.tables['queues'] == [
        list(QUEUE_COLUMNS),
        ['default', '3', '2', page.tables['queues'][1][3], '0', '1', '1'],
        ['reports', '0', '0', '-', '0', '0', '1'],
    ]
    assert re.fullmatch(r'[0-9.]+s', page.tables['queues'][1][3])
    assert [row[:4] for row in page.tables['rates'][1:]] == [[w, '4', '3', '0'] for w in ('1m', '5m', '15m')]

    # the last hour's charts: the known mix's 3 successes and the retried job's, 2 + 1 failures
    for chart_id, title, total in (('succeeded', 'Throughput', 4), ('failed', 'Failures', 3)):
        chart = page.charts[chart_id]
        assert chart.attributes['data-total'] == str(total)
        assert chart.attributes['data-minutes'] == '60'
        assert chart.attributes['aria-labelledby'] == f'{chart_id}-title'
        assert chart.title.startswith(f'{title}, the last 60 minutes: {total} {chart_id} in all')
        assert sum(chart.bars.values()) == total
        assert set(chart.bars) <= {0, 1}  # all of them within the last minute or two

    header, *rows = page.tables['failures']
    assert header == list(FAILURE_COLUMNS)
    failed = {job_id: (await stack.attempts(job_id))[-1] for job_id in [*mix.failed, ODD_ID]}
    newest_first = sorted(failed, key=lambda job_id: failed[job_id]['finished_at'], reverse=True)
    assert [row[:4] for row in rows] == [
        [job_id, 'demo.fail', failed[job_id]['error'], failed[job_id]['worker_id']] for job_id in newest_first
    ]
    assert failed[ODD_ID]['error'] == f'DemoFailure: {MARKUP}'
    assert all(re.fullmatch(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d', row[4]) for row in rows)
    assert page.links['failures'] == [f'/tasks/{quote(job_id, safe="")}' for job_id in newest_first]
    assert '<img' not in raw
    assert '&lt;img src=x onerror=&#34;alert(1)&#34;&gt;' in raw
    assert (odd.status_code, '<img' in odd.text) == (200, False)
    screenshots('workers', url, tmp_path / 'profile')

    task = rendered(f'{monitor.url}/tasks/{retried}', tmp_path / 'profile')
    header, *rows = task.tables['attempts']
    assert header == list(ATTEMPT_COLUMNS)
    assert [row[:3] for row in rows] == [
        ['1', 'retrying', other.worker_id],
        ['2', 'succeeded', other.worker_id],
    ]
    assert rows[1][-1] == '2'  # test.flaky returns its attempt
    assert task.forms == []  # it has finished: nothing to cancel
    screenshots('task', f'{monitor.url}/tasks/{retried}', tmp_path / 'profile')

    running = rendered(f'{monitor.url}/tasks/{mix.running}', tmp_path / 'profile')
    assert [row[1] for row in running.tables['attempts'][1:]] == ['running']
    assert running.forms == [
        {'action': f'/tasks/{mix.running}/cancel', 'method': 'post', 'token': 'password'}
    ]
    screenshots('task-running', f'{monitor.url}/tasks/{mix.running}', tmp_path / 'profile')

    assert unknown.status_code == 404
    assert unknown.headers['content-type'].startswith('text/html')
    assert 'Job no-such-job has no attempt recorded' in unknown.text
