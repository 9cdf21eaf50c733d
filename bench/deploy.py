"""No-op deploy time of the lab with 1 and with 8 worker hosts (`make bench-deploy`).

    python bench/deploy.py                         # 1 and 8 worker hosts (BENCH_WORKERS="1 8")
    python bench/deploy.py --workers 1 4 8 --keep  # more sizes; leave the last labs running

Target: `ansible-playbook deploy.yml` against a fleet already deployed (nothing to change,
changed=0 on every host) takes at most 1.5 x as long with 8 worker hosts as with 1: the hosts
deploy in parallel, so adding hosts should cost little.

For each size N the script writes a throw-away inventory, build/bench-deploy/<N>/inventory/,
derived from inventories/lab: its group_vars copied as they are, lab-db as bench<N>-db (its
host_vars adapted) and N worker hosts bench<N>-worker-1..N (lab-worker-1's host_vars adapted, 2
instances each); lab_fleet names the containers by inventory name, hence the new names.
Each size has its own container names, podman network (flowworker-bench-<N>, subnet
10.89.<100+N>.0/24; the lab has 10.89.213.0/24, the molecule scenarios 10.89.221-228.0/24) and
SSH ports (43000 + 100 N + i; the lab has 42201-42203, molecule 42611-42618), and publishes no
other port (deploy.yml reaches the hosts over SSH alone), so it runs beside the lab and the
molecule scenarios. Then: start the fleet (playbooks/lab.yml), deploy once (timed), deploy again
--noop-runs times (timed, the fastest counts; every host must report changed=0 failed=0, or the
run stops with exit status 2), remove the fleet (unless --keep). Logs: build/bench-deploy/<N>/*.log;
the table also goes to build/bench-deploy/result.json, with the machine's busy CPU time during
each deploy (the controller and the hosts share its CPUs). Exit status 1 when the ratio misses
the target, as `make bench`.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / 'inventories' / 'lab'
OUT = ROOT / 'build' / 'bench-deploy'
TARGET = 1.5
INSTANCES = 2
PORT_BASE = 43000
MAX_WORKERS = 90  # keeps the ports (43000 + 100 N + i) and subnets (10.89.<100+N>) apart
RECAP = re.compile(
    r'^(?P<host>\S+)\s+: ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)'
    r'\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+rescued=(?P<rescued>\d+)\s+ignored=(?P<ignored>\d+)',
    re.MULTILINE,
)
# profile_tasks' summary at the end of a run: "role : Task name ------------ 1.23s"
PROFILE = re.compile(r'^(?P<task>\S.*?) -{3,} (?P<seconds>\d+\.\d+)s$', re.MULTILINE)


class BenchError(RuntimeError):
    pass


@dataclass
class Fleet:
    """One size's throw-away lab: its directory (the logs; the inventory in inventory/), host names."""

    workers: int
    directory: Path
    others: dict[str, str]  # lab host name -> bench host name (lab-db -> bench<N>-db)
    worker_hosts: list[str]
    network: str
    ports: dict[str, int]

    @property
    def inventory(self) -> Path:
        # the inventory alone in its directory: Ansible would read every file beside hosts.yml
        return self.directory / 'inventory'

    @property
    def hosts(self) -> list[str]:
        return [*self.others.values(), *self.worker_hosts]

    @property
    def prefix(self) -> str:
        return f'bench{self.workers}-'


@dataclass
class Result:
    workers: int
    instances_per_host: int = INSTANCES
    lab_up_s: float = 0.0
    first_deploy_s: float = 0.0
    noop_runs_s: list[float] = field(default_factory=list)
    noop_deploy_s: float = 0.0
    # busy CPU-seconds of the machine during the first and the fastest no-op deploy
    first_deploy_cpu_s: float = 0.0
    noop_deploy_cpu_s: float = 0.0
    tasks_per_worker_host: dict[str, int] = field(default_factory=dict)
    tasks_per_db_host: dict[str, int] = field(default_factory=dict)
    slowest_noop_tasks: list[tuple[str, float]] = field(default_factory=list)
    containers: dict[str, Any] = field(default_factory=dict)
    controller: dict[str, int] = field(default_factory=dict)
    # what else ran on the machine when this size started (they share its CPUs)
    other_containers: list[str] = field(default_factory=list)
    load_average_at_start: float = 0.0
    lab_down_s: float | None = None


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.exists() else None


def write_yaml(path: Path, data: Any, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'---\n# {comment}\n' + yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def lab_groups() -> dict[str, list[str]]:
    """The lab inventory's groups and their hosts (hosts.yml: all -> children -> group -> hosts)."""
    children = load_yaml(LAB / 'hosts.yml')['all']['children']
    return {group: list((spec or {}).get('hosts') or {}) for group, spec in children.items()}


def lab_ports() -> set[int]:
    """The controller ports the lab publishes (its SSH ports and lab_fleet_publish)."""
    ports: set[int] = set()
    for path in (LAB / 'host_vars').glob('*.yml'):
        host_vars = load_yaml(path) or {}
        if 'lab_fleet_ssh_port' in host_vars:
            ports.add(int(host_vars['lab_fleet_ssh_port']))
        for spec in host_vars.get('lab_fleet_publish', []):
            ports.add(int(str(spec).split(':')[-2]))
    return ports


def make_fleet(workers: int) -> Fleet:
    """Write build/bench-deploy/<N>/ from inventories/lab, for N worker hosts."""
    directory = OUT / str(workers)
    groups = lab_groups()
    lab_workers = groups.pop('arq_workers')
    lab_others = list(dict.fromkeys(host for hosts in groups.values() for host in hosts))
    prefix = f'bench{workers}-'
    others = {host: prefix + host.removeprefix('lab-') for host in lab_others}
    worker_hosts = [f'{prefix}worker-{i}' for i in range(1, workers + 1)]
    ports = {host: PORT_BASE + 100 * workers + i for i, host in enumerate([*others.values(), *worker_hosts])}
    fleet = Fleet(workers, directory, others, worker_hosts, f'flowworker-bench-{workers}', ports)

    for stale in ('hosts.yml', 'group_vars', 'host_vars'):
        path = fleet.inventory / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    fleet.inventory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(LAB / 'group_vars', fleet.inventory / 'group_vars')

    children = {group: {'hosts': {others[h]: None for h in hosts}} for group, hosts in groups.items()}
    children['arq_workers'] = {'hosts': dict.fromkeys(worker_hosts)}
    write_yaml(
        fleet.inventory / 'hosts.yml',
        {'all': {'children': children}},
        f'Written by bench/deploy.py from inventories/lab: {workers} worker hosts. Thrown away.',
    )

    # what every bench host overrides of the lab's group_vars (host_vars rank above them)
    common = {'lab_fleet_network': fleet.network, 'lab_fleet_subnet': f'10.89.{100 + workers}.0/24'}
    for lab_host, host in others.items():
        host_vars = load_yaml(LAB / 'host_vars' / f'{lab_host}.yml') or {}
        host_vars.update(common, lab_fleet_ssh_port=ports[host], lab_fleet_publish=[])
        if host in (children.get('arq_monitors') or {}).get('hosts', {}):
            # not published on the controller: reachable from the bench network only
            host_vars['stack_monitor_url'] = 'http://{{ inventory_hostname }}:{{ arq_monitor_port }}/workers'
        write_yaml(
            fleet.inventory / 'host_vars' / f'{host}.yml', host_vars, f'{lab_host} of the lab, adapted.'
        )
    template = load_yaml(LAB / 'host_vars' / f'{lab_workers[0]}.yml') or {}
    for host in worker_hosts:
        host_vars = {
            **template,
            **common,
            'lab_fleet_ssh_port': ports[host],
            'arq_worker_instances': INSTANCES,
        }
        host_vars.pop('lab_fleet_publish', None)
        write_yaml(
            fleet.inventory / 'host_vars' / f'{host}.yml', host_vars, f'{lab_workers[0]} of the lab, adapted.'
        )
    check_no_lab_names(fleet, [*lab_others, *lab_workers])
    return fleet


def check_no_lab_names(fleet: Fleet, lab_hosts: list[str]) -> None:
    """Fail when a bench host's inventory variables still name a lab host or a lab port."""
    inventory = json.loads(ansible('ansible-inventory', '-i', str(fleet.inventory), '--list'))
    hostvars = inventory['_meta']['hostvars']
    words = [*lab_hosts, *map(str, lab_ports())]
    pattern = re.compile(r'(?<![\w-])(' + '|'.join(map(re.escape, words)) + r')(?![\w-])')
    found = []
    for host, variables in hostvars.items():
        for name, value in variables.items():
            if isinstance(value, str | list | dict) and (m := pattern.search(json.dumps(value))):
                found.append(f'{host}: {name} mentions {m[1]}')
    if found:
        raise BenchError(
            'the bench inventory still names the lab (adapt bench/deploy.py):\n  ' + '\n  '.join(found)
        )


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'
    env.setdefault('ANSIBLE_CONFIG', str(ROOT / 'ansible.cfg'))
    env.update(ANSIBLE_NOCOLOR='1', ANSIBLE_FORCE_COLOR='0')
    return env


def ansible(*argv: str, log: Path | None = None) -> str:
    """Run an Ansible command from the repository's root. With ``log``: its output and errors go
    there as it runs (`tail -f` it) and are returned; without, its output alone is returned."""
    if log:
        with log.open('w') as out:
            returncode = subprocess.run(
                argv, cwd=ROOT, env=environment(), stdout=out, stderr=subprocess.STDOUT, check=False
            ).returncode
        output = errors = log.read_text()
    else:
        result = subprocess.run(
            argv, cwd=ROOT, env=environment(), capture_output=True, text=True, check=False
        )
        returncode, output, errors = result.returncode, result.stdout, result.stdout + result.stderr
    if returncode:
        tail = '\n'.join(errors.splitlines()[-40:])
        raise BenchError(f'{" ".join(argv)} failed (exit {returncode}; {log or "no log"}):\n{tail}')
    return output


def cpu_busy_seconds() -> float:
    """CPU-seconds the whole machine has been busy since boot (all CPUs; /proc/stat)."""
    ticks = [int(n) for n in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf('SC_CLK_TCK')


@dataclass
class Run:
    seconds: float
    cpu_seconds: float  # the machine's busy CPU-seconds meanwhile: controller and hosts share it
    output: str


def playbook(fleet: Fleet, name: str, playbook: str, *args: str) -> Run:
    """Run a playbook against the fleet: its wall time, the CPU time spent meanwhile, its output."""
    fleet.directory.mkdir(parents=True, exist_ok=True)
    log = fleet.directory / f'{name}.log'
    start, cpu = time.monotonic(), cpu_busy_seconds()
    output = ansible('ansible-playbook', '-i', str(fleet.inventory), playbook, *args, log=log)
    return Run(time.monotonic() - start, cpu_busy_seconds() - cpu, output)


def recap(fleet: Fleet, output: str, name: str, *, noop: bool) -> dict[str, dict[str, int]]:
    """The PLAY RECAP per host; fails unless every host is there, unfailed (and unchanged: noop)."""
    counts = {
        m['host']: {k: int(v) for k, v in m.groupdict().items() if k != 'host'}
        for m in RECAP.finditer(output)
    }
    bad = [f'{host}: missing from the PLAY RECAP' for host in fleet.hosts if host not in counts]
    for host, c in counts.items():
        if c['failed'] or c['unreachable'] or (noop and c['changed']):
            bad.append(f'{host}: changed={c["changed"]} failed={c["failed"]} unreachable={c["unreachable"]}')
    if bad:
        what = 'a no-op deploy must change nothing' if noop else 'the first deploy failed'
        log = fleet.directory / f'{name}.log'
        raise BenchError(f'{what} ({log}):\n  ' + '\n  '.join(bad))
    return counts


def tasks(counts: dict[str, int]) -> dict[str, int]:
    return {'ok': counts['ok'], 'skipped': counts['skipped'], 'total': counts['ok'] + counts['skipped']}


def bench_leftovers(fleet: Fleet) -> bool:
    """Whether containers or the network of this size are still there (an earlier --keep or crash)."""
    names = subprocess.run(
        ['podman', 'ps', '-a', '--format', '{{.Names}}', '--filter', f'name=^{fleet.prefix}'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    network = subprocess.run(['podman', 'network', 'exists', fleet.network], check=False).returncode == 0
    return bool(names) or network


def check_ports_free(fleet: Fleet) -> None:
    busy = []
    for host, port in fleet.ports.items():
        with socket.socket() as sock:
            try:
                sock.bind(('127.0.0.1', port))
            except OSError:
                busy.append(f'{port} ({host})')
    if busy:
        raise BenchError(f'ports in use on 127.0.0.1, needed by the bench lab: {", ".join(busy)}')


def container_stats(fleet: Fleet) -> dict[str, Any]:
    """Memory (MiB) and process count of each bench container, and their sums."""
    result = subprocess.run(
        ['podman', 'stats', '--no-stream', '--format', 'json', *fleet.hosts],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        return {'error': result.stderr.strip()}
    per_host: dict[str, dict[str, float]] = {}
    for row in json.loads(result.stdout or '[]'):
        used = row.get('mem_usage', '').split('/')[0].strip()
        per_host[row['name']] = {'memory_mib': round(to_mib(used), 1), 'pids': int(row.get('pids') or 0)}
    return {
        'memory_mib_total': round(sum(h['memory_mib'] for h in per_host.values()), 1),
        'pids_total': sum(int(h['pids']) for h in per_host.values()),
        'per_host': per_host,
    }


def to_mib(text: str) -> float:
    m = re.fullmatch(r'([\d.]+)\s*([kKMGT]?i?B)', text)
    if not m:
        return 0.0
    scale = {'B': 1, 'kB': 1e3, 'KB': 1e3, 'KiB': 1024, 'MB': 1e6, 'MiB': 1024**2, 'GB': 1e9, 'GiB': 1024**3}
    return float(m[1]) * scale.get(m[2], 1) / 1024**2


class Sampler(threading.Thread):
    """The controller's lowest available memory and highest process count while a size runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.min_available_mib = sys.maxsize
        self.max_processes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for line in Path('/proc/meminfo').read_text().splitlines():
                if line.startswith('MemAvailable:'):
                    self.min_available_mib = min(self.min_available_mib, int(line.split()[1]) // 1024)
            processes = sum(1 for p in Path('/proc').iterdir() if p.name.isdigit())
            self.max_processes = max(self.max_processes, processes)
            self.stop.wait(2)

    def summary(self) -> dict[str, int]:
        pid_max = int(Path('/proc/sys/kernel/pid_max').read_text())
        return {
            'min_mem_available_mib': self.min_available_mib,
            'max_processes': self.max_processes,
            'pid_max': pid_max,
        }


def measure(workers: int, noop_runs: int, keep: bool) -> Result:
    def say(text: str) -> None:
        print(f'[{workers} worker hosts] {text}', flush=True)

    fleet = make_fleet(workers)
    result = Result(workers)
    say(f'inventory {fleet.inventory.relative_to(ROOT)}: {", ".join(fleet.hosts)}')
    if bench_leftovers(fleet):
        say('removing what an earlier run left of this size')
        playbook(fleet, 'lab-leftovers', 'playbooks/lab.yml', '-e', 'lab_fleet_state=absent')
    check_ports_free(fleet)
    running = subprocess.run(
        ['podman', 'ps', '--format', '{{.Names}}'], capture_output=True, text=True, check=True
    )
    result.other_containers = running.stdout.split()
    result.load_average_at_start = os.getloadavg()[0]
    if result.other_containers:
        say(f'note: running beside {len(result.other_containers)} other containers (shared CPUs)')
    sampler = Sampler()
    sampler.start()
    try:
        result.lab_up_s = playbook(fleet, 'lab', 'playbooks/lab.yml').seconds
        say(f'lab up in {result.lab_up_s:.1f} s')
        first = playbook(fleet, 'deploy-1', 'deploy.yml')
        recap(fleet, first.output, 'deploy-1', noop=False)
        result.first_deploy_s, result.first_deploy_cpu_s = first.seconds, first.cpu_seconds
        say(f'first deploy {result.first_deploy_s:.1f} s')
        best: Run | None = None
        for number in range(2, noop_runs + 2):
            run = playbook(fleet, f'deploy-{number}', 'deploy.yml')
            counts = recap(fleet, run.output, f'deploy-{number}', noop=True)
            result.noop_runs_s.append(run.seconds)
            if best is None or run.seconds < best.seconds:
                best, best_counts = run, counts
            say(f'no-op deploy {number - 1}: {run.seconds:.1f} s, changed=0 on all {len(counts)} hosts')
        assert best is not None
        result.noop_deploy_s, result.noop_deploy_cpu_s = best.seconds, best.cpu_seconds
        result.tasks_per_worker_host = tasks(best_counts[fleet.worker_hosts[0]])
        db = next(iter(fleet.others.values()))
        result.tasks_per_db_host = tasks(best_counts[db])
        slowest = PROFILE.finditer(best.output)
        result.slowest_noop_tasks = [(m['task'], float(m['seconds'])) for m in slowest][:5]
        result.containers = container_stats(fleet)
    finally:
        sampler.stop.set()
        sampler.join()
        result.controller = sampler.summary()
        if keep:
            say(
                f'kept; remove with: ansible-playbook -i {fleet.inventory.relative_to(ROOT)} '
                'playbooks/lab.yml -e lab_fleet_state=absent'
            )
        else:
            result.lab_down_s = playbook(
                fleet, 'lab-down', 'playbooks/lab.yml', '-e', 'lab_fleet_state=absent'
            ).seconds
            say(f'lab removed in {result.lab_down_s:.1f} s')
    return result


def ratio_of(results: list[Result]) -> tuple[int, int, float] | None:
    if len(results) < 2:
        return None
    small, large = min(results, key=lambda r: r.workers), max(results, key=lambda r: r.workers)
    return large.workers, small.workers, large.noop_deploy_s / small.noop_deploy_s


def report(results: list[Result]) -> str:
    cpus = os.cpu_count() or 1
    head = ['workers', 'first deploy s', 'no-op deploy s', 'no-op runs s', 'no-op CPU-s (busy)']
    head += ['tasks/worker host', 'tasks/db host', 'containers']
    rows: list[list[str]] = [head]
    for r in results:
        busy = r.noop_deploy_cpu_s / (r.noop_deploy_s * cpus)
        worker, db = r.tasks_per_worker_host, r.tasks_per_db_host
        memory, pids = r.containers.get('memory_mib_total', 0), r.containers.get('pids_total', 0)
        rows.append(
            [
                str(r.workers),
                f'{r.first_deploy_s:.1f}',
                f'{r.noop_deploy_s:.1f}',
                ', '.join(f'{s:.1f}' for s in r.noop_runs_s),
                f'{r.noop_deploy_cpu_s:.0f} ({busy:.0%} of {cpus})',
                f'{worker["total"]} ({worker["skipped"]} skipped)',
                f'{db["total"]} ({db["skipped"]} skipped)',
                f'{memory:.0f} MiB, {pids} pids',
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ['  '.join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    ratio = ratio_of(results)
    if ratio:
        large, small, value = ratio
        verdict = 'met' if value <= TARGET else 'MISSED'
        lines.append(f'ratio {large}/{small}: {value:.2f} (target <= {TARGET}: {verdict})')
    for r in results:
        lines.append(f'slowest tasks of the no-op deploy, {r.workers} worker hosts:')
        lines += [f'  {s:6.2f} s  {task}' for task, s in r.slowest_noop_tasks]
    return '\n'.join(lines)


def modified() -> list[str]:
    """Uncommitted changes to what a deploy runs (git status of its roles, playbooks and sources)."""
    paths = ['roles', 'playbooks', 'deploy.yml', 'inventories/lab', 'worker/src']
    status = subprocess.run(
        ['git', 'status', '--porcelain', '--', *paths], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return status.stdout.splitlines()


def forks() -> int:
    config = configparser.ConfigParser()
    config.read(ROOT / 'ansible.cfg')
    return config.getint('defaults', 'forks', fallback=5)


def save(results: list[Result], modified_at_start: list[str], *, complete: bool) -> Path:
    ratio = ratio_of(results)
    commit = subprocess.run(
        ['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=False
    )
    data = {
        'complete': complete,
        'target': TARGET,
        'ratio': {'of': list(ratio[:2]), 'value': round(ratio[2], 3)} if ratio else None,
        'commit': commit.stdout.strip(),
        # what the deploy ran of the working tree, uncommitted (at the start and now)
        'modified_at_start': modified_at_start,
        'modified_at_end': modified(),
        'cpus': os.cpu_count(),
        'forks': forks(),
        'results': [asdict(r) for r in results],
    }
    path = OUT / 'result.json'
    path.write_text(json.dumps(data, indent=2) + '\n')
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 8], help='worker host counts (1 8)')
    parser.add_argument('--noop-runs', type=int, default=3, help='no-op deploys per size; the fastest counts')
    parser.add_argument('--keep', action='store_true', help='leave each size running (its own names, ports)')
    args = parser.parse_args()
    if any(not 1 <= n <= MAX_WORKERS for n in args.workers) or args.noop_runs < 1:
        parser.error(f'--workers from 1 to {MAX_WORKERS}, --noop-runs at least 1')
    OUT.mkdir(parents=True, exist_ok=True)
    if max(args.workers) + 1 > forks():
        print('note: more hosts than ansible.cfg forks: Ansible runs them in batches', flush=True)
    modified_at_start = modified()

    results: list[Result] = []
    for workers in dict.fromkeys(args.workers):
        try:
            results.append(measure(workers, args.noop_runs, args.keep))
        except BenchError as error:
            save(results, modified_at_start, complete=False)
            print(f'\nbench-deploy: {error}', file=sys.stderr)
            return 2
        save(results, modified_at_start, complete=False)
    path = save(results, modified_at_start, complete=True)
    print()
    print(report(results))
    print(f'(also in {path.relative_to(ROOT)})')
    ratio = ratio_of(results)
    return 1 if ratio and ratio[2] > TARGET else 0


if __name__ == '__main__':
    sys.exit(main())
