"""`make compose-demo` and `make compose-down`: compose.yaml on this machine, with the images
`make compose-images` built from Debian's packages.

    python compose/demo.py up     # the stack (3 workers and the monitor), 60 demo flows, who ran them
    python compose/demo.py down   # its containers, network, volumes and settings gone

The settings go to build/compose/compose.env (mode 0600), the passwords made at random the first
time; the Compose project is flowworker-demo and publishes Redis on 127.0.0.1:42790, PostgreSQL
on 42791 and the monitor on 42792, beside the lab and the tests. Any docker-compose command works
on it the same way: docker-compose --env-file build/compose/compose.env -p flowworker-demo ...
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import redis
from arq.connections import RedisSettings, create_pool

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / 'build' / 'compose' / 'compose.env'
PROJECT = 'flowworker-demo'
REDIS_PORT, POSTGRES_PORT, MONITOR_PORT = 42790, 42791, 42792
QUEUE = 'arq:queue:default'  # the workers' (FLOWWORKER_QUEUE_NAME default), as a producer names it


def settings() -> dict[str, str]:
    """The stack's settings, written once with passwords of its own."""
    if ENV_FILE.is_file():
        return dict(line.split('=', 1) for line in ENV_FILE.read_text().splitlines() if '=' in line)
    password = {name: secrets.token_hex(16) for name in ('redis', 'postgres', 'owner', 'worker', 'monitor')}
    values = {
        'REDIS_PASSWORD': password['redis'],
        'POSTGRES_PASSWORD': password['postgres'],
        'FLOWWORKER_OWNER_PASSWORD': password['owner'],
        'FLOWWORKER_WORKER_PASSWORD': password['worker'],
        'MONITOR_TOKEN': password['monitor'],
        'DATABASE_OWNER_URL': f'postgresql://flow_owner:{password["owner"]}@postgres:5432/flows',
        'DATABASE_URL': f'postgresql://flow_worker:{password["worker"]}@postgres:5432/flows',
        'REDIS_URL': f'redis://:{password["redis"]}@redis:6379/0',
        'REDIS_IMAGE': 'localhost/flowworker-redis:7',
        'POSTGRES_IMAGE': 'localhost/flowworker-postgres:15',
        'WORKER_BASE_IMAGE': 'localhost/flowworker-python:3.11-bookworm',
        'REDIS_PUBLISH': f'127.0.0.1:{REDIS_PORT}',
        'POSTGRES_PUBLISH': f'127.0.0.1:{POSTGRES_PORT}',
        'MONITOR_PUBLISH': f'127.0.0.1:{MONITOR_PORT}',
    }
    ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
    ENV_FILE.touch(mode=0o600)
    ENV_FILE.write_text(''.join(f'{name}={value}\n' for name, value in values.items()))
    return values


def compose(*args: str) -> None:
    command = ['docker-compose', '--env-file', str(ENV_FILE), '-p', PROJECT, '--profile', 'monitor', *args]
    subprocess.run(command, cwd=ROOT, check=True)


async def demo(values: dict[str, str]) -> dict[str, int]:
    """60 demo.echo flows from a plain arq producer; how many each worker ran (its records)."""
    producer = await create_pool(
        RedisSettings.from_dsn(f'redis://:{values["REDIS_PASSWORD"]}@127.0.0.1:{REDIS_PORT}/0')
    )
    try:
        enqueue = producer.enqueue_job
        jobs = [await enqueue('run_flow', 'demo.echo', {'n': n}, _queue_name=QUEUE) for n in range(60)]
    finally:
        await producer.aclose()
    job_ids = [job.job_id for job in jobs if job is not None]
    dsn = f'postgresql://flow_worker:{values["FLOWWORKER_WORKER_PASSWORD"]}@127.0.0.1:{POSTGRES_PORT}/flows'
    db = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(120):
            while True:
                rows = await db.fetch(
                    'SELECT worker_id, count(*) AS ran FROM flow_task_attempts '
                    "WHERE job_id = ANY($1) AND status = 'succeeded' GROUP BY worker_id ORDER BY worker_id",
                    job_ids,
                )
                if sum(row['ran'] for row in rows) == len(job_ids):
                    return {row['worker_id']: row['ran'] for row in rows}
                await asyncio.sleep(0.5)
    finally:
        await db.close()


def up() -> int:
    values = settings()
    compose('up', '-d')
    client = redis.Redis(port=REDIS_PORT, password=values['REDIS_PASSWORD'])
    deadline = time.monotonic() + 120
    while len(list(client.scan_iter('arq:worker:*'))) < 3:
        if time.monotonic() > deadline:
            print('the workers did not beat within 120 s: docker-compose logs worker', file=sys.stderr)
            return 1
        time.sleep(0.5)
    ran = asyncio.run(demo(values))
    for worker_id, count in ran.items():
        print(f'worker {worker_id} ran {count} of the {sum(ran.values())} flows')
    token = f'MONITOR_TOKEN in {ENV_FILE.relative_to(ROOT)}'
    print(f'monitor: http://127.0.0.1:{MONITOR_PORT}/workers (token: {token})')
    print(f'producers: redis://:<REDIS_PASSWORD>@127.0.0.1:{REDIS_PORT}/0; make compose-down removes it all')
    return 0


def down() -> int:
    if ENV_FILE.is_file():
        compose('down', '--volumes', '--remove-orphans')
        ENV_FILE.unlink()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('action', choices=['up', 'down'])
    return up() if parser.parse_args().action == 'up' else down()


if __name__ == '__main__':
    sys.exit(main())
