"""compose.yaml with Docker (docker.io and docker-compose, Debian's packages): the guide's
commands against a stack made from nothing, the images of `make compose-images`.

Docker, not podman: podman (4.3 here) runs healthchecks from systemd timers, and where PID 1 is not
systemd they never run, so `depends_on: condition: service_healthy` would wait forever; dockerd
runs them itself. The stack gets ports of its own (Redis 42690, PostgreSQL 42691) and the Compose
project flowworker-test, beside the lab and `make compose-demo`. The tests run in file order on
one stack; the last one stops Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
from arq.connections import RedisSettings, create_pool

from .conftest import QUEUE, ROOT, Load, final_attempts, flow_package, running_attempt, wait_until

PROJECT = 'flowworker-test'
REDIS_PORT, POSTGRES_PORT = 42690, 42691
PASSWORDS = {
    'REDIS_PASSWORD': 'compose-redis-password',
    'POSTGRES_PASSWORD': 'compose-postgres-password',
    'FLOWWORKER_OWNER_PASSWORD': 'compose-owner-password',
    'FLOWWORKER_WORKER_PASSWORD': 'compose-worker-password',
    'MONITOR_TOKEN': 'compose-monitor-token',
}
# Debian's docker client (docker.io): another docker earlier in PATH may not be
DOCKER = '/usr/bin/docker'
BASE_IMAGE = 'localhost/flowworker-python:3.11-bookworm'
CA_BUNDLE = os.environ.get('CA_BUNDLE', '/etc/ssl/certs/ca-certificates.crt')


class Stack:
    """The Compose project: its commands, and where producers and the records are."""

    def __init__(self, env_file: Path) -> None:
        self.env_file = env_file
        self.compose = ['docker-compose', '--env-file', str(env_file), '-p', PROJECT]

    def configure(self, **settings: str) -> None:
        """Add ``settings`` to the env file, as an operator edits theirs."""
        with self.env_file.open('a') as env:
            env.writelines(f'{name}={value}\n' for name, value in settings.items())

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.compose, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0 or not check, f'{args}: {done.stdout}{done.stderr}'
        return done

    def redis_url(self) -> str:
        return f'redis://:{PASSWORDS["REDIS_PASSWORD"]}@127.0.0.1:{REDIS_PORT}/0'

    def worker_dsn(self) -> str:
        password = PASSWORDS['FLOWWORKER_WORKER_PASSWORD']
        return f'postgresql://flow_worker:{password}@127.0.0.1:{POSTGRES_PORT}/flows'

    def replicas(self) -> list[str]:
        """The worker containers' ids."""
        return self.run('ps', '-q', 'worker').stdout.split()

    def heartbeats(self) -> list[str]:
        with redis.Redis.from_url(self.redis_url(), decode_responses=True) as client:
            return sorted(client.scan_iter('arq:worker:*'))

    def inspect(self, container: str, template: str) -> str:
        done = subprocess.run(
            [DOCKER, 'inspect', '--format', template, container], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()


@pytest.fixture(scope='module')
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env_file = tmp_path_factory.mktemp('compose') / 'compose.env'
    settings = {
        **PASSWORDS,
        'DATABASE_OWNER_URL': f'postgresql://flow_owner:{PASSWORDS["FLOWWORKER_OWNER_PASSWORD"]}@postgres:5432/flows',
        'DATABASE_URL': f'postgresql://flow_worker:{PASSWORDS["FLOWWORKER_WORKER_PASSWORD"]}@postgres:5432/flows',
        'REDIS_URL': f'redis://:{PASSWORDS["REDIS_PASSWORD"]}@redis:6379/0',
        'REDIS_IMAGE': 'localhost/flowworker-redis:7',
        'POSTGRES_IMAGE': 'localhost/flowworker-postgres:15',
        'WORKER_BASE_IMAGE': BASE_IMAGE,
        'REDIS_PUBLISH': f'127.0.0.1:{REDIS_PORT}',
        'POSTGRES_PUBLISH': f'127.0.0.1:{POSTGRES_PORT}',
        'WORKER_HEALTHCHECK_INTERVAL': '2s',
        'FLOWWORKER_DRAIN_TIMEOUT': '20',
    }
    stack = Stack(env_file)
    stack.configure(**settings)
    stack.run('down', '--volumes', '--remove-orphans')
    stack.run('up', '-d')
    yield stack
    stack.run('down', '--volumes', '--remove-orphans', check=False)


async def produce(stack: Stack, flows: int) -> list[str]:
    producer = await create_pool(RedisSettings.from_dsn(stack.redis_url()))
    try:
        jobs = [
            await producer.enqueue_job('run_flow', 'demo.echo', {'n': n}, _queue_name=QUEUE)
            for n in range(flows)
        ]
        return [job.job_id for job in jobs if job is not None]
    finally:
        await producer.aclose()


def records(stack: Stack, job_ids: list[str], timeout: float = 120) -> dict[str, list[str]]:
    """Each job's attempts' statuses, once every job has a final one."""
    attempts = asyncio.run(final_attempts(stack.worker_dsn(), job_ids, timeout))
    return {job_id: [row['status'] for row in rows] for job_id, rows in attempts.items()}


def test_the_stack_runs_200_flows_from_a_plain_arq_producer_on_three_replicas(stack: Stack) -> None:
    wait_until(lambda: len(stack.heartbeats()) == 3, 60, 'three heartbeats')
    job_ids = asyncio.run(produce(stack, 200))

    done = records(stack, job_ids)

    assert len(job_ids) == 200
    assert {job_id: statuses for job_id, statuses in done.items() if statuses != ['succeeded']} == {}
    heartbeats = stack.heartbeats()
    assert len(heartbeats) == 3
    # each replica its own worker id: its container's hostname
    hostnames = {stack.inspect(c, '{{.Config.Hostname}}') for c in stack.replicas()}
    assert {key.removeprefix('arq:worker:').split(':')[0] for key in heartbeats} == hostnames


def test_the_image_runs_as_a_user_of_its_own(stack: Stack) -> None:
    [uid, user] = stack.run('exec', '-T', '--index=1', 'worker', 'sh', '-c', 'id -u; id -un').stdout.split()
    assert (uid, user) == ('10001', 'flowworker')
    assert stack.inspect(stack.replicas()[0], '{{.Config.User}}') == 'flowworker'


def test_scale_to_five_then_to_two_under_load_loses_no_job(stack: Stack) -> None:
    with Load(stack) as load:
        stack.run('up', '-d', '--scale', 'worker=5')
        wait_until(lambda: len(stack.heartbeats()) == 5, 60, 'five heartbeats')
        stack.run('up', '-d', '--scale', 'worker=2')
        # the surplus replicas drained and deleted their heartbeats as they stopped
        assert len(stack.heartbeats()) == 2
        time.sleep(2)

    assert load.job_ids
    assert load.not_once_succeeded() == {}


def test_restart_under_load_loses_no_job(stack: Stack) -> None:
    before = stack.replicas()
    with Load(stack) as load:
        stack.run('restart', 'worker')
        time.sleep(2)

    assert stack.replicas() == before
    assert load.not_once_succeeded() == {}
    wait_until(lambda: len(stack.heartbeats()) == 2, 60, 'both replicas beating again')


def build_context(root: Path) -> Path:
    """What worker/Containerfile builds from, copied from the repository's root (the files
    .dockerignore lets through), with flows/ holding its README alone."""
    for name in (
        '.dockerignore',
        'flows/README.md',
        'worker/Containerfile',
        'worker/pyproject.toml',
        'worker/requirements.lock',
        'worker/README.md',
        'worker/scripts/start_worker.py',
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    ignore = shutil.ignore_patterns('__pycache__', '*.egg-info')
    shutil.copytree(ROOT / 'worker' / 'src', root / 'worker' / 'src', ignore=ignore)
    return root


def test_a_flow_package_put_in_flows_is_built_into_the_image_and_its_flow_runs(
    stack: Stack, tmp_path: Path
) -> None:
    context = build_context(tmp_path)
    flow_package(context / 'flows')
    image = 'flowworker-test-flows'
    build = subprocess.run(
        [
            DOCKER,
            'build',
            '--quiet',
            '--build-arg',
            f'BASE_IMAGE={BASE_IMAGE}',
            '--secret',
            f'id=pip-ca,src={CA_BUNDLE}',
            '-t',
            image,
            '-f',
            str(context / 'worker' / 'Containerfile'),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, 'DOCKER_BUILDKIT': '1'},
    )
    assert build.returncode == 0, build.stderr
    # the release: the new image for every service, its module named, the stack brought up again
    stack.configure(WORKER_IMAGE=image, FLOWWORKER_FLOW_MODULES='extra_flows')

    stack.run('up', '-d')

    assert {stack.inspect(c, '{{.Config.Image}}') for c in stack.replicas()} == {image}

    async def version() -> tuple[str, object]:
        producer = await create_pool(RedisSettings.from_dsn(stack.redis_url()))
        try:
            job = await producer.enqueue_job('run_flow', 'extra.version', {}, _queue_name=QUEUE)
            assert job is not None
            return job.job_id, await job.result(timeout=120, poll_delay=0.5)
        finally:
            await producer.aclose()

    job_id, result = asyncio.run(version())
    assert result == 'extra-flows 1.0'
    assert records(stack, [job_id]) == {job_id: ['succeeded']}
    replicas = len(stack.replicas())
    wait_until(lambda: len(stack.heartbeats()) == replicas, 60, 'every replica beating')


def test_a_replica_killed_mid_job_has_its_job_run_again(stack: Stack) -> None:
    async def started() -> tuple[str, str]:
        """A long job, and the worker id its attempt is recorded running under."""
        producer = await create_pool(RedisSettings.from_dsn(stack.redis_url()))
        db = await asyncpg.connect(stack.worker_dsn())
        try:
            job = await producer.enqueue_job('run_flow', 'demo.sleep', {'seconds': 8}, _queue_name=QUEUE)
            assert job is not None
            return job.job_id, await running_attempt(db, job.job_id)
        finally:
            await producer.aclose()
            await db.close()

    job_id, worker_id = asyncio.run(started())
    hostname = worker_id.split(':')[0]
    victim = next(c for c in stack.replicas() if stack.inspect(c, '{{.Config.Hostname}}') == hostname)
    # SIGKILL to the worker process from the host, as a crash (docker kill would count as a stop
    # asked for, which the restart policy leaves alone)
    os.kill(int(stack.inspect(victim, '{{.State.Pid}}')), signal.SIGKILL)

    statuses = records(stack, [job_id], timeout=180)[job_id]
    assert statuses[-1] == 'succeeded', statuses
    assert len(statuses) == 2, statuses  # the killed attempt, then the one that ran it again
    # restart: unless-stopped brings the killed replica back
    restarted = '{{.State.Running}} {{.RestartCount}}'
    wait_until(lambda: stack.inspect(victim, restarted) == 'true 1', 60, 'a restart')
    replicas = len(stack.replicas())
    wait_until(lambda: len(stack.heartbeats()) == replicas, 60, 'every replica beating')


def test_a_replica_that_cannot_reach_redis_turns_unhealthy(stack: Stack) -> None:
    replica = stack.replicas()[0]
    wait_until(lambda: stack.inspect(replica, '{{.State.Health.Status}}') == 'healthy', 60, 'healthy')
    stack.run('stop', 'redis')
    try:
        wait_until(lambda: stack.inspect(replica, '{{.State.Health.Status}}') == 'unhealthy', 60, 'unhealthy')
        log = json.loads(stack.inspect(replica, '{{json .State.Health.Log}}'))
        assert 'cannot reach Redis' in log[-1]['Output'] or 'last beat' in log[-1]['Output'], log[-1]
    finally:
        stack.run('start', 'redis')
    wait_until(lambda: stack.inspect(replica, '{{.State.Health.Status}}') == 'healthy', 90, 'healthy again')
