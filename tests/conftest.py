"""The lab fleet for end-to-end tests: made from nothing once per session, deployed by the tests."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import asyncpg
import pytest
import redis.asyncio
import redis.exceptions
import yaml
from arq.connections import RedisSettings, create_pool

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / 'inventories' / 'lab'
# with LAB: two more Redis hosts and three sentinels (test_sentinel.py, `make demo LAB_HA=true`)
LAB_HA = ROOT / 'inventories' / 'lab-ha'
# the ports lab-db publishes on the controller's loopback (inventories/lab/host_vars/lab-db.yml)
REDIS_PORT, REDIS_TLS_PORT, POSTGRESQL_PORT = 42379, 42380, 42432
WORKERS = {'lab-worker-1': 3, 'lab-worker-2': 2}
RECAP = re.compile(
    r'^(?P<host>\S+)\s+: ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)'
    r'\s+failed=(?P<failed>\d+)',
    re.MULTILINE,
)


@dataclass
class Run:
    returncode: int
    output: str

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP per host: ok, changed, unreachable, failed."""
        return {
            m['host']: {k: int(v) for k, v in m.groupdict().items() if k != 'host'}
            for m in RECAP.finditer(self.output)
        }

    def changed_hosts(self) -> set[str]:
        return {host for host, counts in self.recap.items() if counts['changed']}


def ansible_playbook(inventory: Path, playbook: str, *args: str) -> Run:
    result = subprocess.run(
        ['ansible-playbook', '-i', str(inventory), playbook, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return Run(result.returncode, result.stdout + result.stderr)


@dataclass
class Lab:
    inventory: Path

    def vars(self, *path: str) -> dict[str, object]:
        data: dict[str, object] = yaml.safe_load(self.inventory.joinpath(*path).read_text())
        return data

    def deploy(self, *args: str) -> Run:
        return ansible_playbook(self.inventory, 'deploy.yml', *args)

    def copy(self, destination: Path) -> Lab:
        """A copy of the inventory (with the lab's key), to change without touching the real one."""
        shutil.copytree(self.inventory, destination)
        return Lab(destination)

    def set_vars(self, relative: str, values: dict[str, Any]) -> None:
        """Merge `values` into an inventory file (made if missing)."""
        path = self.inventory / relative
        current = yaml.safe_load(path.read_text()) if path.exists() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**(current or {}), **values}))

    def secret(self, name: str) -> str:
        return str(self.vars('group_vars', 'all', 'stack.yml')[name])

    @property
    def tls(self) -> bool:
        """The inventory turns TLS on (inventories/lab/group_vars/all/tls.yml)."""
        return bool(self.vars('group_vars', 'all', 'tls.yml')['lab_fleet_tls'])

    @property
    def ca(self) -> Path:
        """The lab CA that playbooks/lab.yml makes with lab_fleet_tls."""
        return self.inventory / '.lab' / 'tls' / 'ca.crt'

    def redis_password(self, user: str) -> str:
        """The password of one of the lab's Redis users (its default user is off)."""
        users = self.vars('group_vars', 'all', 'stack.yml')['redis_server_users']
        assert isinstance(users, list)
        return str(next(entry['password'] for entry in users if entry['name'] == user))

    def redis_url(self, user: str = 'producer') -> str:
        """As a plain arq producer logs in, with the lab's `producer` user (the worker's rules)."""
        scheme, port = ('rediss', REDIS_TLS_PORT) if self.tls else ('redis', REDIS_PORT)
        return f'{scheme}://{user}:{self.redis_password(user)}@127.0.0.1:{port}/0'

    def redis_tls(self) -> dict[str, Any]:
        """With TLS: verify the server's certificate against the lab CA, and its name."""
        return {'ssl_ca_certs': str(self.ca), 'ssl_check_hostname': True} if self.tls else {}

    def redis_settings(self) -> RedisSettings:
        """For a plain arq producer."""
        settings = RedisSettings.from_dsn(self.redis_url())
        for name, value in self.redis_tls().items():
            setattr(settings, name, value)
        return settings

    def worker_dsn(self) -> str:
        password = self.secret('postgresql_worker_password')
        tls = f'?sslmode=verify-full&sslrootcert={self.ca}' if self.tls else ''
        return f'postgresql://flow_worker:{password}@127.0.0.1:{POSTGRESQL_PORT}/flows{tls}'

    def run_flows(self, count: int) -> tuple[list[Any], list[asyncpg.Record]]:
        """demo.echo flows from a plain arq producer: their results, and their task records once
        every one is recorded as succeeded (records lag the jobs by the store's linger)."""

        async def produce() -> tuple[list[Any], list[asyncpg.Record]]:
            producer = await create_pool(self.redis_settings())
            try:
                queue = 'arq:queue:default'
                jobs = [
                    await producer.enqueue_job('run_flow', 'demo.echo', {'n': n}, _queue_name=queue)
                    for n in range(count)
                ]
                results = [await job.result(timeout=120, poll_delay=0.1) for job in jobs if job is not None]
                ids = [job.job_id for job in jobs if job is not None]
            finally:
                await producer.aclose()
            db = await asyncpg.connect(self.worker_dsn())
            try:
                async with asyncio.timeout(30):
                    while len(
                        rows := await db.fetch(
                            "SELECT * FROM flow_tasks WHERE job_id = ANY($1) AND status = 'succeeded'",
                            ids,
                        )
                    ) < len(ids):
                        await asyncio.sleep(0.2)
            finally:
                await db.close()
            return results, rows

        return asyncio.run(produce())

    def heartbeats(self) -> dict[str, dict[str, Any]]:
        """The live worker processes: heartbeat key → its JSON."""

        async def read() -> dict[str, dict[str, Any]]:
            client = redis.asyncio.Redis.from_url(self.redis_url(), decode_responses=True, **self.redis_tls())
            try:
                keys = [key async for key in client.scan_iter('arq:worker:*')]
                return {key: json.loads(await client.get(key) or '{}') for key in keys}
            finally:
                await client.aclose()

        return asyncio.run(read())

    def pids(self, host: str) -> dict[str, int]:
        return {key: beat['pid'] for key, beat in self.heartbeats().items() if beat['host'] == host}


def assert_deployed(run: Run) -> None:
    assert run.returncode == 0, run.output[-5000:]
    assert set(run.recap) == {'lab-db', *WORKERS}
    assert not any(counts['failed'] or counts['unreachable'] for counts in run.recap.values())


def podman_exec(host: str, *argv: str, check: bool = True) -> str:
    """Run a command in a lab container; its stdout."""
    return subprocess.run(
        ['podman', 'exec', host, *argv], capture_output=True, text=True, check=check
    ).stdout.strip()


# the Prometheus host of the lab (group prometheus_servers) and where the roles write the targets
PROMETHEUS_HOST = 'lab-db'
SD_DIR = '/etc/prometheus/file_sd/flowworker'
METRICS_PORT = 9300


def scrape_targets(host: str) -> list[dict[str, Any]]:
    """The file-SD entries that worker host ``host`` wrote on the lab's Prometheus host."""
    found: list[dict[str, Any]] = json.loads(podman_exec(PROMETHEUS_HOST, 'cat', f'{SD_DIR}/{host}.json'))
    return found


def current_version(host: str) -> str:
    """The worker version a host runs (the target of its `current` link)."""
    return podman_exec(host, 'readlink', '/opt/arq-worker/current')


# a flow package's module: one flow, which says which release runs it
EXTRA_FLOWS = (
    'from flowworker import flow\n\n\n'
    "@flow('extra.version')\n"
    'async def version() -> str:\n'
    "    return 'extra-flows 1.0'\n"
)


def flow_package(root: Path, name: str = 'extra-flows', source: str = EXTRA_FLOWS) -> Path:
    """A team's flow package, version 1.0, in ``root``: distribution ``name``, its one module (the
    name with underscores) of ``source``."""
    package = root / name
    module = package / name.replace('-', '_')
    module.mkdir(parents=True)
    (package / 'pyproject.toml').write_text(
        f'[project]\nname = "{name}"\nversion = "1.0"\n[build-system]\nrequires = ["setuptools"]\n'
        'build-backend = "setuptools.build_meta"\n'
    )
    (module / '__init__.py').write_text(source)
    return package


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_sentinel.py last: it leaves the lab with sentinels, which no other module expects."""
    items.sort(key=lambda item: item.path.name == 'test_sentinel.py')


QUEUE = 'arq:queue:default'


async def running_attempt(db: asyncpg.Connection, job_id: str, timeout: float = 60) -> str:
    """The worker id a job's attempt is recorded running under, once it is."""
    async with asyncio.timeout(timeout):
        while not (
            worker_id := await db.fetchval(
                "SELECT worker_id FROM flow_task_attempts WHERE job_id = $1 AND status = 'running'", job_id
            )
        ):
            await asyncio.sleep(0.2)
    return str(worker_id)


class Endpoints(Protocol):
    """Where a fleet's producers and its records are: the lab's, or the Compose stack's."""

    def redis_url(self) -> str: ...

    def worker_dsn(self) -> str: ...


# seconds a job may take to be recorded after the load stopped (generous: the machine is shared)
SETTLE_TIMEOUT = 180


class Load:
    """`demo.sleep` flows of 0.2-3 s enqueued every 1/rate s, and heartbeats sampled, in a thread."""

    def __init__(self, lab: Endpoints, rate: float = 4.0, sample_every: float = 0.2) -> None:
        self.lab = lab
        self.rate = rate
        self.sample_every = sample_every
        self.job_ids: list[str] = []
        # (monotonic time, {host: instances whose heartbeat says `running`})
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name='load')
        self._error: BaseException | None = None

    def __enter__(self) -> Load:
        self._thread.start()
        time.sleep(3)  # the fleet is busy before the playbook starts
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None and kind is None:
            raise self._error

    async def _run(self) -> None:
        try:
            await asyncio.gather(self._produce(), self._sample())
        except BaseException as e:  # reported by __exit__ in the test's thread
            self._error = e

    async def _produce(self) -> None:
        producer = await create_pool(RedisSettings.from_dsn(self.lab.redis_url()))
        try:
            while not self._stop.is_set():
                seconds = round(random.uniform(0.2, 3.0), 2)
                job = await producer.enqueue_job(
                    'run_flow', 'demo.sleep', {'seconds': seconds}, _queue_name=QUEUE
                )
                assert job is not None
                self.job_ids.append(job.job_id)
                await asyncio.sleep(1 / self.rate)
        finally:
            await producer.aclose()

    async def _sample(self) -> None:
        client = redis.asyncio.Redis.from_url(self.lab.redis_url(), decode_responses=True)
        try:
            while not self._stop.is_set():
                keys = [key async for key in client.scan_iter('arq:worker:*')]
                beats = [b for b in await client.mget(keys) if b] if keys else []
                running: dict[str, int] = {}
                for raw in beats:
                    beat = json.loads(raw)
                    if beat.get('state') == 'running':
                        running[beat['host']] = running.get(beat['host'], 0) + 1
                self.samples.append((time.monotonic(), running))
                await asyncio.sleep(self.sample_every)
        finally:
            await client.aclose()

    def fewest_running(self, host: str) -> int:
        return min(running.get(host, 0) for _, running in self.samples)

    def most_running(self, host: str) -> int:
        return max(running.get(host, 0) for _, running in self.samples)

    def attempts(self) -> dict[str, list[asyncpg.Record]]:
        """Every attempt of every job, once each job has a final one (or SETTLE_TIMEOUT passed)."""
        return asyncio.run(final_attempts(self.lab.worker_dsn(), self.job_ids, SETTLE_TIMEOUT))

    def not_once_succeeded(self) -> dict[str, list[tuple[Any, ...]]]:
        """The jobs that did not run exactly once and succeed, with their attempts."""
        return {
            job_id: [(r['attempt'], r['status'], r['worker_id'], r['error']) for r in rows]
            for job_id, rows in self.attempts().items()
            if [r['status'] for r in rows] != ['succeeded']
        }

    def assert_every_job_succeeded_once(self) -> None:
        assert len(self.job_ids) >= 20, 'the load was too thin to show anything'
        wrong = self.not_once_succeeded()
        assert not wrong, f'{len(wrong)} of {len(self.job_ids)} jobs did not succeed exactly once: {wrong}'


async def final_attempts(dsn: str, job_ids: list[str], timeout: float) -> dict[str, list[asyncpg.Record]]:
    """Every attempt of each job, in order, once each job has a final one (or ``timeout`` passed)."""
    db = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await db.fetch(
                'SELECT job_id, attempt, status, worker_id, error FROM flow_task_attempts '
                'WHERE job_id = ANY($1) ORDER BY job_id, attempt',
                job_ids,
            )
            done = {r['job_id'] for r in rows if r['status'] in ('succeeded', 'failed', 'cancelled')}
            if len(done) == len(job_ids) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await db.close()
    out: dict[str, list[asyncpg.Record]] = {job_id: [] for job_id in job_ids}
    for row in rows:
        out[row['job_id']].append(row)
    return out


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` every half second until it is truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'{what} did not happen within {timeout} s')
        time.sleep(0.5)


@pytest.fixture(scope='session')
def lab() -> Iterator[Lab]:
    """The lab fleet, made anew: containers from the image, nothing deployed yet (the hosts of
    LAB_HA removed too, where a run left them)."""
    down = ansible_playbook(LAB, 'playbooks/lab.yml', '-i', str(LAB_HA), '-e', 'lab_fleet_state=absent')
    assert down.returncode == 0, down.output
    up = ansible_playbook(LAB, 'playbooks/lab.yml')
    assert up.returncode == 0, up.output
    yield Lab(LAB)
    ansible_playbook(LAB, 'playbooks/lab.yml', '-i', str(LAB_HA), '-e', 'lab_fleet_state=absent')


def keys_of(host: str, count: int) -> set[str]:
    """The heartbeat keys of `count` systemd instances on `host`."""
    return {f'arq:worker:{host}:arq-worker@{n}' for n in range(1, count + 1)}


# the heartbeat keys of every worker instance of the lab's inventory
LAB_KEYS: set[str] = set().union(*(keys_of(host, count) for host, count in WORKERS.items()))


def runs_as_its_inventory_says(lab: Lab) -> bool:
    """Every worker instance of the lab's inventory beats, running, and no other."""
    try:
        beats = lab.heartbeats()
    except (OSError, redis.exceptions.RedisError):
        return False
    return set(beats) == LAB_KEYS and all(beat.get('state') == 'running' for beat in beats.values())


@pytest.fixture(scope='session')
def first_deploy(lab: Lab) -> Lab:
    """deploy.yml applied once to the lab made from nothing: it prints no error on the way (an
    error a later task recovers from still reads as a failure to a new user)."""
    run = lab.deploy()
    assert_deployed(run)
    assert '[ERROR]' not in run.output, run.output[-5000:]
    return lab


@pytest.fixture(scope='module')
def deployed(first_deploy: Lab) -> Lab:
    """The lab as its inventory says. Modules that change it put it back when they end; when one
    could not (it failed halfway), deploy.yml runs again here, so each module starts from the lab."""
    if not runs_as_its_inventory_says(first_deploy):
        assert_deployed(first_deploy.deploy())
    return first_deploy
