"""Run the test layers side by side and print the wall time of each part (`make test`).

    python tests/suite.py                      # every layer: lint, worker, roles, e2e, compose
    python tests/suite.py roles [SCENARIO...]  # molecule scenarios (all, or the named ones)
    python tests/suite.py e2e [-k EXPR]        # the end-to-end tests (or those matching EXPR)

Each part is one command whose output goes to build/test-logs/<part>.log; the progress lines
say when a part starts and ends, a failed part's log tail is printed, and the run ends with a
table of every part's wall time, the whole run's time, and a warning when the run took longer
than WARN_AFTER (a warning, never a failure: timing is not a test).

The parts are independent: the molecule scenarios use distinct container names, SSH ports and
networks (molecule/*/molecule.yml), the end-to-end tests use the lab fleet, so up to --jobs of
them run at once. The end-to-end tests, the longest part, start first and keep their pace: the
other parts run under `nice` (and the scenario hosts at a lower CPU weight,
.config/molecule/config.yml), in the order of their last measured time, longest first, so that
the cores stay busy to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / 'build' / 'test-logs'
# the last measured wall time of each part, to start the longest first; before any run in this
# checkout (CI's fresh clone), the times of a fresh-clone run beside each other (seconds)
TIMES = LOGS / 'times.json'
FIRST_RUN: dict[str, float] = {
    'roles:supervisor': 563,
    'roles:pypi': 447,
    'roles:postgresql': 296,
    'roles:default': 380,
    'roles:redis_server': 180,
    'worker': 178,
    'roles:sentinel': 160,
    'roles:bad_inputs': 152,
    'lint': 58,
    'compose': 420,
}
# The fixed loopback ports of the lab (inventories/lab*) and the scenarios (molecule/*/molecule.yml)
# lie in Linux's ephemeral range (32768-60999): a client's or a test server's port taken at random
# there made a scenario's container fail to publish its port. Reserved, the kernel hands none of
# them out.
RESERVED_PORTS = '42200-42700'
RESERVED = Path('/proc/sys/net/ipv4/ip_local_reserved_ports')
BUDGET = 25 * 60
WARN_AFTER = 30 * 60
SCENARIOS = sorted(p.parent.name for p in (ROOT / 'molecule').glob('*/molecule.yml'))
# what a part's log says of its own tests, shown in the table
SUMMARY = re.compile(r'^=*\s*(\d+ (passed|failed)\b.*?)\s*=*$|^INFO\s+(Molecule executed .*)$', re.MULTILINE)
COLOUR = re.compile(r'\x1b\[[0-9;]*m')


@dataclass
class Part:
    layer: str
    name: str
    argv: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    summary: str = ''

    @property
    def label(self) -> str:
        return self.layer if self.name == self.layer else f'{self.layer}:{self.name}'

    @property
    def log(self) -> Path:
        return LOGS / f'{self.label.replace(":", "-")}.log'


def parts(layers: list[str], scenarios: list[str], keyword: str | None) -> list[Part]:
    found: list[Part] = []
    nice = ['nice', '-n', '10']
    if 'lint' in layers:
        found.append(Part('lint', 'lint', [*nice, 'make', '--no-print-directory', 'lint']))
    if 'worker' in layers:
        found.append(Part('worker', 'worker', [*nice, 'make', '--no-print-directory', 'test-worker']))
    if 'roles' in layers:
        found += [Part('roles', name, [*nice, 'molecule', 'test', '-s', name]) for name in scenarios]
    if 'e2e' in layers:
        selection = ['-k', keyword] if keyword else []
        # tests/static (no host) is lint's, tests/test_compose.py (Docker) the compose part's
        pytest = ['pytest', '-q', '--durations=15', 'tests', '--ignore=tests/static']
        pytest.append('--ignore=tests/test_compose.py')
        found.append(Part('e2e', 'e2e', [*pytest, *selection]))
    if 'compose' in layers:
        found.append(Part('compose', 'compose', [*nice, 'make', '--no-print-directory', 'test-compose']))
    return found


def reserve_ports() -> str:
    """Keep the kernel from giving RESERVED_PORTS to anyone as an ephemeral port (needs root)."""
    current = RESERVED.read_text().strip() if RESERVED.exists() else ''
    if RESERVED_PORTS in current.split(','):
        return f'ports {RESERVED_PORTS} reserved'
    try:
        RESERVED.write_text(','.join(filter(None, [current, RESERVED_PORTS])))
    except OSError as e:
        return f'warning: ports {RESERVED_PORTS} not reserved ({e}): a random port may take a fixed one'
    return f'ports {RESERVED_PORTS} reserved (net.ipv4.ip_local_reserved_ports), not handed out at random'


def clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f'{minutes}m{rest:02d}s'


class Runner:
    def __init__(self, started: float) -> None:
        self.started = started
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            print(f'[{clock(time.monotonic() - self.started):>7}] {text}', flush=True)

    def run(self, part: Part) -> Part:
        self.say(f'{part.label}: started ({" ".join(part.argv)}; log {part.log.relative_to(ROOT)})')
        begin = time.monotonic()
        with part.log.open('w') as log:
            done = subprocess.run(part.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
        part.returncode = done.returncode
        part.seconds = time.monotonic() - begin
        text = COLOUR.sub('', part.log.read_text(errors='replace'))
        summaries = [m.group(1) or m.group(3) for m in SUMMARY.finditer(text)]
        part.summary = summaries[-1] if summaries else ''
        verdict = 'passed' if part.returncode == 0 else f'FAILED (exit {part.returncode})'
        self.say(f'{part.label}: {verdict} in {clock(part.seconds)}  {part.summary}')
        if part.returncode != 0:
            tail = '\n'.join(text.splitlines()[-120:])
            self.say(f'{part.label}: last lines of {part.log.relative_to(ROOT)}:\n{tail}\n')
        return part


def table(done: list[Part], total: float) -> str:
    rows = [('part', 'result', 'wall', 'its own summary')]
    rows += [
        (p.label, 'passed' if p.returncode == 0 else 'FAILED', clock(p.seconds), p.summary) for p in done
    ]
    rows.append(('whole run', '', clock(total), f'budget {clock(BUDGET)}, warning past {clock(WARN_AFTER)}'))
    a, b, c = (max(len(row[i]) for row in rows) for i in range(3))
    return '\n'.join(f'{r[0]:<{a}}  {r[1]:<{b}}  {r[2]:>{c}}  {r[3]}'.rstrip() for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    layers = ['roles', 'e2e', 'compose']
    parser.add_argument('layer', nargs='?', choices=layers, help='one layer only (default: all)')
    parser.add_argument('scenarios', nargs='*', help=f'with `roles`: these scenarios only, of {SCENARIOS}')
    parser.add_argument('-k', dest='keyword', help='with `e2e`: only the tests that match (pytest -k)')
    parser.add_argument(
        '--jobs', type=int, default=int(os.environ.get('TEST_JOBS', '3')), help='parts at once (default 3)'
    )
    args = parser.parse_args()
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown or (args.scenarios and args.layer != 'roles'):
        parser.error(f'scenarios {unknown or args.scenarios}: give `roles` and names of {SCENARIOS}')
    if args.keyword and args.layer not in (None, 'e2e'):
        parser.error('-k selects end-to-end tests: give `e2e`')
    if args.jobs < 1:
        parser.error(f'--jobs {args.jobs}: give 1 or more')

    layers = [args.layer] if args.layer else ['lint', 'worker', 'roles', 'e2e', 'compose']
    todo = parts(layers, args.scenarios or SCENARIOS, args.keyword)
    LOGS.mkdir(parents=True, exist_ok=True)
    last: dict[str, float] = json.loads(TIMES.read_text()) if TIMES.is_file() else FIRST_RUN
    # e2e first (the longest), then the rest longest first (a new scenario counts as long)
    todo.sort(key=lambda p: (p.layer != 'e2e', -last.get(p.label, 600)))

    started = time.monotonic()
    runner = Runner(started)
    runner.say(reserve_ports())
    runner.say(f'{len(todo)} parts, {args.jobs} at once: {", ".join(p.label for p in todo)}')
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(runner.run, todo))
    total = time.monotonic() - started

    TIMES.write_text(json.dumps({**last, **{p.label: round(p.seconds) for p in done}}, indent=1) + '\n')
    failed = [p for p in done if p.returncode != 0]
    print('\n' + table(done, total))
    if total > WARN_AFTER:
        print(
            f'\nWARNING: the tests took {clock(total)}, past the {clock(WARN_AFTER)} guard '
            f'(budget {clock(BUDGET)}): the table above shows which part grew.'
        )
    if failed:
        print(f'\nfailed: {", ".join(p.label for p in failed)} (logs in {LOGS.relative_to(ROOT)}/)')
    print(f'parts: {len(done) - len(failed)} passed, {len(failed)} failed')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
