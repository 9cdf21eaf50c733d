"""Past one Redis: the lab with two more Redis hosts and three sentinels (`make demo LAB_HA=true`),
its master killed under load, then its host stopped whole.

A producer next to the workers (in lab-worker-1, as an application server would run, with redis-py's
Sentinel and arq's enqueue_job, retrying on every Redis error) enqueues short `demo.sleep` flows
and prints each acknowledged job. Each time: the sentinels promote a replica; every worker
process picks jobs again, the same process (no restart); every job acknowledged at least a second
before the kill ran exactly once (`min-replicas-to-write 1`: the promoted replica had it), and one
acknowledged later may be lost with the replication window, counted; the old master comes back as
a replica. Then deploy.yml changes nothing: the roles take the new topology. The figures go to
build/test-logs/sentinel-failover.json. This module runs last (conftest): it leaves the lab with
sentinels, which the other modules do not expect.
"""

from __future__ import annotations

import asyncio
import json
import operator
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from .conftest import LAB_HA, ROOT, WORKERS, Lab, Run, ansible_playbook, final_attempts, podman_exec

NODES = ('lab-db', 'lab-redis-2', 'lab-redis-3')
MASTER_NAME = 'flowworker'
SENTINEL_PASSWORD = 'lab-redis-sentinel-password'  # inventories/lab-ha/hosts.yml
# a job acknowledged this long before the kill is on a replica (min-replicas-to-write 1)
SAFE_BEFORE_KILL = 1.0
FIGURES = ROOT / 'build' / 'test-logs' / 'sentinel-failover.json'
PRODUCER = """
import asyncio, json, os, sys, time
from arq.connections import ArqRedis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

async def main(seconds, rate, password, user_password, stop):
    hosts = [(name, 26379) for name in ('lab-db', 'lab-redis-2', 'lab-redis-3')]
    sentinel = Sentinel(hosts, sentinel_kwargs={'password': password, 'socket_timeout': 0.5})
    master = sentinel.master_for(
        'flowworker', redis_class=ArqRedis, username='producer', password=user_password,
        socket_timeout=1, socket_connect_timeout=1,
    )
    end = time.monotonic() + seconds
    while time.monotonic() < end and not os.path.exists(stop):
        try:
            job = await master.enqueue_job(
                'run_flow', 'demo.sleep', {'seconds': 0.2}, _queue_name='arq:queue:default'
            )
        except (RedisError, OSError) as e:
            job, error = None, type(e).__name__
        else:
            # None: a connection lost while arq watched the job's key
            error = 'not enqueued'
        if job is None:
            print(json.dumps({'error': error, 'at': time.time()}), flush=True)
        else:
            print(json.dumps({'job': job.job_id, 'at': time.time()}), flush=True)
        await asyncio.sleep(1 / rate)

asyncio.run(main(float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]))
"""


def deploy_ha(lab: Lab, *args: str) -> Run:
    return ansible_playbook(lab.inventory, 'deploy.yml', '-i', str(LAB_HA), *args)


def assert_deployed_ha(run: Run) -> None:
    assert run.returncode == 0, run.output[-5000:]
    assert set(run.recap) == {*NODES, *WORKERS}
    assert not any(counts['failed'] or counts['unreachable'] for counts in run.recap.values())


def sentinel_says(asked: str) -> str | None:
    """The master one sentinel names, by host name; None when it cannot be asked."""
    argv = ['podman', 'exec', asked, 'redis-cli', '--no-auth-warning', '--raw', '-p', '26379']
    argv += ['-a', SENTINEL_PASSWORD, 'SENTINEL', 'GET-MASTER-ADDR-BY-NAME', MASTER_NAME]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and len(lines) == 2 else None


def agreed(among: tuple[str, ...] = NODES) -> str | None:
    """The node the sentinels (of the hosts in ``among``) all name master; None while they differ."""
    named = {sentinel_says(host) for host in among}
    return named.pop() if len(named) == 1 else None


def master(among: tuple[str, ...] = NODES) -> str:
    found = agreed(among)
    assert found is not None, {host: sentinel_says(host) for host in among}
    return found


def role(node: str, lab: Lab) -> list[str]:
    argv = ['redis-cli', '--no-auth-warning', '--raw', '--user', 'admin', '-a', lab.redis_password('admin')]
    return podman_exec(node, *argv, 'ROLE', check=False).split()


def worker_pids(node: str, lab: Lab) -> dict[str, int]:
    """The live worker processes, from their heartbeats on ``node`` (the master)."""
    argv = ['redis-cli', '--no-auth-warning', '--raw', '--user', 'admin', '-a', lab.redis_password('admin')]
    keys = podman_exec(node, *argv, '--scan', '--pattern', 'arq:worker:*').split()
    beats = [json.loads(podman_exec(node, *argv, 'GET', key)) for key in keys]
    return {f'{beat["host"]}:{beat["worker_id"]}': beat['pid'] for beat in beats}


def wait_for(what: str, condition: Any, timeout: float = 90) -> float:
    """Poll ``condition`` until it is true; the time it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        time.sleep(0.2)
    return time.time()


def journals() -> dict[str, str]:
    """The workers' logs of the last minutes, for a failure's message."""
    return {
        host: podman_exec(
            host, 'journalctl', '--no-pager', '-u', 'arq-worker@*', '--since', '-3min', check=False
        )[-6000:]
        for host in WORKERS
    }


@dataclass
class Produced:
    acked: dict[str, float] = field(default_factory=dict)  # job id → when enqueue_job returned
    errors: list[float] = field(default_factory=list)


class Producer:
    """The producer in lab-worker-1, until :meth:`result` (``seconds`` at most)."""

    STOP = '/run/producer-stop'

    def __init__(self, lab: Lab, seconds: float = 180, rate: float = 20) -> None:
        podman_exec('lab-worker-1', 'rm', '-f', self.STOP)
        argv = ['podman', 'exec', 'lab-worker-1', '/opt/arq-worker/current/bin/python', '-c', PRODUCER]
        argv += [str(seconds), str(rate), SENTINEL_PASSWORD, lab.redis_password('producer'), self.STOP]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> Produced:
        podman_exec('lab-worker-1', 'touch', self.STOP)
        out, err = self.process.communicate(timeout=120)
        assert self.process.returncode == 0, err
        produced = Produced()
        for line in out.splitlines():
            event = json.loads(line)
            if 'job' in event:
                produced.acked[event['job']] = event['at']
            else:
                produced.errors.append(event['at'])
        return produced


def attempts(lab: Lab, job_ids: list[str], since: float) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Each job's attempts (statuses, once every job has a final one or 120 s passed), and each
    worker process's first start after ``since`` (epoch seconds)."""

    async def read() -> tuple[dict[str, list[str]], dict[str, float]]:
        found = await final_attempts(lab.worker_dsn(), job_ids, 120)
        db = await asyncpg.connect(lab.worker_dsn())
        try:
            firsts = await db.fetch(
                'SELECT worker_id, extract(epoch FROM min(started_at)) AS first FROM flow_task_attempts '
                'WHERE started_at > to_timestamp($1) GROUP BY worker_id',
                since,
            )
        finally:
            await db.close()
        statuses = {job_id: [row['status'] for row in rows] for job_id, rows in found.items()}
        return statuses, {r['worker_id']: float(r['first']) for r in firsts}

    return asyncio.run(read())


@pytest.fixture(scope='module')
def ha(deployed: Lab) -> Lab:
    """The lab with inventories/lab-ha: lab-db's Redis replicated to two more hosts, three sentinels."""
    up = ansible_playbook(deployed.inventory, 'playbooks/lab.yml', '-i', str(LAB_HA))
    assert up.returncode == 0, up.output[-5000:]
    assert_deployed_ha(deploy_ha(deployed))
    assert master() == 'lab-db'
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text('{}')
    return deployed


def fail_over(lab: Lab, how: str, kill: Any, revive: Any) -> None:
    """Under load: kill the master (``kill(node)``), measure the failover, bring the node back
    (``revive(node)``) and check it replicates the new master; every figure in FIGURES[how]."""
    old = master()
    pids = worker_pids(old, lab)
    assert len(pids) == sum(WORKERS.values()), (pids, journals())
    producer = Producer(lab)
    time.sleep(6)  # the fleet is busy before the kill
    killed = time.time()
    kill(old)
    try:
        others = tuple(node for node in NODES if node != old)
        # (a split vote of the two sentinels left delays the promotion by failover-timeout x 2)
        promoted = wait_for('a promotion', lambda: sentinel_says(others[0]) not in (None, old), timeout=120)
        new = master(others)
        time.sleep(12)  # the load goes on against the new master
        produced = producer.result()
    finally:
        revive(old)
    # (a host started again boots first, then its redis-server; the sentinels turn it into a replica)
    rejoined = ['slave', new, '6379', 'connected']
    wait_for(f'{old} to replicate {new}', lambda: role(old, lab)[:4] == rejoined, timeout=240)

    # the first second after the kill: what the old master took as it died
    statuses, firsts = attempts(lab, list(produced.acked), killed + 1)
    safe = [job for job, at in produced.acked.items() if at <= killed - SAFE_BEFORE_KILL]
    window = [job for job, at in produced.acked.items() if killed - SAFE_BEFORE_KILL < at <= killed]
    after = [job for job, at in produced.acked.items() if at > killed]
    lost_in_window = [job for job in window if not statuses[job]]
    gaps = sorted(firsts[worker] - killed for worker in firsts)
    acks = sorted(produced.acked.values())
    figures = {
        'jobs acknowledged': len(produced.acked),
        'acknowledged >= 1 s before the kill': len(safe),
        'acknowledged in the last second before the kill': len(window),
        'lost of those (replication window)': len(lost_in_window),
        'acknowledged after the kill': len(after),
        'enqueue errors (retried)': len(produced.errors),
        'seconds until the sentinels named a new master': round(promoted - killed, 2),
        'seconds from the kill until each worker process ran a job again, p50': round(
            statistics.median(gaps), 2
        )
        if gaps
        else None,
        'seconds from the kill until each worker process ran a job again, max': round(gaps[-1], 2)
        if gaps
        else None,
        'longest time the producer could not enqueue, seconds': round(
            max(map(operator.sub, acks[1:], acks)), 2
        ),
    }
    FIGURES.write_text(json.dumps({**json.loads(FIGURES.read_text()), how: figures}, indent=2))
    assert new != old
    assert after, 'nothing was enqueued after the failover'
    # every job acknowledged a second before the kill, and every one after it, ran exactly once
    wrong = {job: statuses[job] for job in safe + after + window if statuses[job] not in (['succeeded'], [])}
    assert not wrong, (wrong, figures)
    assert not [job for job in safe + after if not statuses[job]], figures
    # every worker process picks jobs again, the same processes (nothing restarted them)
    assert len(gaps) == sum(WORKERS.values()), (firsts, figures, journals())
    assert worker_pids(new, lab) == pids, journals()


def test_a_sigkilled_master_is_replaced_and_comes_back_as_a_replica(ha: Lab) -> None:
    # systemd starts the killed redis-server again after the failover (redis_server_restart_sec)
    def kill(node: str) -> None:
        podman_exec(node, 'systemctl', 'kill', '--signal=SIGKILL', 'redis-server')

    fail_over(ha, 'SIGKILL of the master', kill, lambda node: None)


def test_a_master_whose_host_stops_is_replaced_and_the_host_comes_back_as_a_replica(ha: Lab) -> None:
    # a Redis host of its own (lab-db runs PostgreSQL and the monitor too): the last test moved the master
    assert master() != 'lab-db'

    def stop(node: str) -> None:
        subprocess.run(['podman', 'stop', node], capture_output=True, check=True)

    def start(node: str) -> None:
        subprocess.run(['podman', 'start', node], capture_output=True, check=True)

    fail_over(ha, 'the master host stopped', stop, start)


def test_a_deploy_after_the_failovers_changes_nothing_and_keeps_the_new_master(ha: Lab) -> None:
    # a master other than the inventory's first, which a role that forced its topology would restore
    if master() == 'lab-db':
        argv = ['redis-cli', '--no-auth-warning', '-p', '26379', '-a', SENTINEL_PASSWORD]
        assert podman_exec('lab-db', *argv, 'SENTINEL', 'FAILOVER', MASTER_NAME) == 'OK'
        wait_for('the sentinels to agree on another master', lambda: agreed() not in (None, 'lab-db'))
    before = master()
    assert before != 'lab-db'
    run = deploy_ha(ha)
    assert_deployed_ha(run)
    assert run.changed_hosts() == set(), run.output[-5000:]
    assert master() == before
