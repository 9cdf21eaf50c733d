"""Every name rule of the arq_worker role's instances, and the plan that brings a host from what
it runs to what its pools ask for.

Pure: no I/O. ``library/arq_worker_instances.py`` finds what the host runs (whatever manages it)
and applies the plan; ``tests/static/test_instance_plan.py`` tests the rules and the plan.

Names (a pool ``default`` has the prefix ``arq-worker``, a pool ``<name>`` ``arq-worker-<name>``):

- systemd: the template unit ``<prefix>@.service``, the target ``<prefix>.target`` (with its
  ``.wants`` directory), the instances ``<prefix>@<n>.service`` with their enablement links and
  drop-ins, worker id ``<host id>:<prefix>@<n>``;
- supervisor: the group ``<prefix>`` (file ``<prefix>.conf``), the programs ``<prefix>_<nn>``
  (file ``<prefix>_<nn>.conf``, logs ``<prefix>_<nn>.log*``, ``<prefix>_<nn>-error.log*``),
  worker id ``<host id>:<prefix>_<nn>``.

Anything else (``arq-worker-backup.timer``, ``arq-worker-rpc.conf``) is not the role's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import zip_longest

MANAGERS = ('systemd', 'supervisor')
PREFIX = r'arq-worker(?:-[a-z0-9_]{1,32})?'
# process states that hold (or are about to hold) a process
RUNNING = {
    'systemd': ('active', 'activating', 'reloading', 'deactivating'),
    'supervisor': ('RUNNING', 'STARTING', 'BACKOFF', 'STOPPING'),
}
# supervisord's own RPC extension file, which matches the group-file pattern
SUPERVISOR_RPC_FILE = 'arq-worker-rpc.conf'

_UNIT = re.compile(rf'^(?P<prefix>{PREFIX})@(?P<n>[1-9][0-9]*)\.service$')
_PROGRAM = re.compile(rf'^(?P<prefix>{PREFIX})_(?P<n>[0-9]{{2,}})$')
_SYSTEMD_POOL = re.compile(rf'^(?P<prefix>{PREFIX})(?:@\.service(?:\.d)?|\.target(?:\.wants)?)$')
_SUPERVISOR_FILE = re.compile(
    rf'^(?P<name>{PREFIX}(?:_[0-9]{{2,}})?)(?:\.conf|(?:-error)?\.log(?:\.[0-9]+)?)$'
)


def prefix_of(pool: str) -> str:
    """The unit and program prefix of the pool named ``pool``."""
    return 'arq-worker' if pool == 'default' else f'arq-worker-{pool}'


@dataclass(frozen=True, order=True)
class Instance:
    """One worker process slot: ``number`` of pool ``prefix`` under ``manager``."""

    manager: str
    prefix: str
    number: int

    @property
    def name(self) -> str:
        if self.manager == 'systemd':
            return f'{self.prefix}@{self.number}.service'
        return f'{self.prefix}_{self.number:02d}'

    @property
    def target(self) -> str:
        """What systemctl or supervisorctl takes."""
        return self.name if self.manager == 'systemd' else f'{self.prefix}:{self.name}'

    def worker_id(self, host_id: str) -> str:
        """Its heartbeat key is ``arq:worker:<worker id>``."""
        return f'{host_id}:{self.name.removesuffix(".service")}'


def parse_instance(name: str) -> Instance | None:
    """The instance a unit name (``arq-worker@2.service``), a program name (``arq-worker_02``)
    or a supervisorctl name (``arq-worker:arq-worker_02``) stands for; None if it is not one."""
    match = _UNIT.match(name)
    if match:
        return Instance('systemd', match['prefix'], int(match['n']))
    group, _, program = name.rpartition(':')
    match = _PROGRAM.match(program)
    if match and group in ('', match['prefix']):
        return Instance('supervisor', match['prefix'], int(match['n']))
    return None


def parse_worker_id(worker_id: str, host_id: str) -> Instance | None:
    """The instance of host ``host_id`` a heartbeat's worker id names; None if it names none."""
    if not worker_id.startswith(host_id + ':'):
        return None
    name = worker_id[len(host_id) + 1 :]
    return parse_instance(name + '.service' if '@' in name else name)


def systemd_pool_of(file_name: str) -> str | None:
    """The pool prefix of a pool-level systemd file (template unit, its drop-in directory, target,
    target's wants directory, or an enablement link of the target); None if it is none."""
    match = _SYSTEMD_POOL.match(file_name)
    return match['prefix'] if match else None


def supervisor_file_of(file_name: str) -> tuple[str, Instance | None] | None:
    """For a file in supervisor's configuration or log directory: (the pool prefix, the instance
    it belongs to, None for a group file); None if it is not one of the role's."""
    if file_name == SUPERVISOR_RPC_FILE:
        return None
    match = _SUPERVISOR_FILE.match(file_name)
    if match is None:
        return None
    name = match['name']
    instance = parse_instance(name)
    if instance is not None:
        return instance.prefix, instance
    if file_name.endswith('.conf'):
        return name, None
    return None


@dataclass(frozen=True)
class Pool:
    """What the inventory asks for: ``count`` instances of ``prefix``."""

    prefix: str
    count: int
    drain_timeout: float

    def instances(self, manager: str) -> list[Instance]:
        return [Instance(manager, self.prefix, n) for n in range(1, self.count + 1)]


@dataclass(frozen=True)
class Found:
    """One instance found on the host: loaded, running, or only its files on disk."""

    instance: Instance
    running: bool = False
    pid: int = 0
    # wall-clock start of its process, and the newest change to its configuration (unit or
    # program file, env file, current version): a process older than its configuration restarts
    started_at: float | None = None
    config_at: float = 0.0
    enabled: bool = True
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Host:
    """What the host runs and holds, whatever manages it."""

    instances: tuple[Found, ...] = ()
    # pool-level files by (manager, prefix): template units, targets, wants dirs, group files
    pool_files: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    # systemd targets found enabled and active
    targets_up: frozenset[str] = frozenset()
    # worker ids of this host's heartbeat keys
    keys: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Step:
    """One thing to do, in order: ``drain`` (quiet, wait, stop) one instance, ``start`` some
    (and wait for their heartbeats), ``restart`` one (drain, start, wait)."""

    verb: str
    instances: tuple[Instance, ...]


@dataclass
class Plan:
    manager: str
    start: list[Instance] = field(default_factory=list)
    stop: list[Instance] = field(default_factory=list)
    restart: list[Instance] = field(default_factory=list)
    enable: list[Instance] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    drain: list[Instance] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    pools_gone: list[tuple[str, str]] = field(default_factory=list)
    forget: list[str] = field(default_factory=list)
    drain_timeouts: dict[str, float] = field(default_factory=dict)

    @property
    def changes(self) -> bool:
        return any((self.start, self.stop, self.restart, self.enable, self.targets, self.remove, self.forget))

    def steps(self) -> list[Step]:
        """The order that keeps a host of N instances between N-1 and N+1 running: each old
        instance drained before a new one starts in its place (a change of process manager, a
        renamed pool), then the other drains, then the other starts together, then the restarts
        one at a time."""
        drains = self.drain
        starts = self.start
        paired = min(len(drains), len(starts))
        steps: list[Step] = []
        for old, new in zip_longest(drains[:paired], starts[:paired]):
            steps += [Step('drain', (old,)), Step('start', (new,))]
        steps += [Step('drain', (old,)) for old in drains[paired:]]
        if starts[paired:]:
            steps.append(Step('start', tuple(starts[paired:])))
        steps += [Step('restart', (instance,)) for instance in self.restart]
        return steps

    def as_dict(self) -> dict[str, list[str]]:
        """What the role reports (the fact ``arq_worker_plan``)."""
        return {
            'start': [i.name for i in self.start],
            'stop': [i.name for i in self.stop],
            'restart': [i.name for i in self.restart],
            'remove': list(self.remove),
            'forget': list(self.forget),
        }


def plan(
    manager: str,
    pools: list[Pool],
    host: Host,
    host_id: str,
    *,
    default_drain_timeout: float,
    restart_all: bool = False,
) -> Plan:
    """From what ``host`` runs to ``pools`` under ``manager``.

    - start: wanted instances that do not run (new, stopped, failed);
    - stop: every instance found that is not wanted, whatever manages it; those running are
      drained first; their files (and the pool files of pools no longer wanted under this
      manager) are removed;
    - restart: wanted instances that run a process older than their configuration (every one
      that runs, with ``restart_all``);
    - forget: heartbeat keys of this host that name no wanted instance.

    With ``restart_all`` (the rolling restart) only restarts and starts are planned.
    """
    if manager not in MANAGERS:
        raise ValueError(f'manager must be one of {", ".join(MANAGERS)}; got {manager!r}')
    wanted = {i for pool in pools for i in pool.instances(manager)}
    found = {f.instance: f for f in host.instances}
    result = Plan(manager)
    drain_timeouts = {pool.prefix: pool.drain_timeout for pool in pools}
    for instance in sorted(wanted | set(found)):
        result.drain_timeouts[instance.name] = drain_timeouts.get(instance.prefix, default_drain_timeout)
    for instance in sorted(wanted):
        seen = found.get(instance)
        if seen is None or not seen.running:
            result.start.append(instance)
        elif restart_all or (seen.started_at is not None and seen.config_at > seen.started_at):
            result.restart.append(instance)
        elif not seen.enabled:
            result.enable.append(instance)
    if restart_all:
        return result
    if manager == 'systemd':
        result.targets = sorted(p.prefix for p in pools if p.prefix not in host.targets_up)
    for instance in sorted(set(found) - wanted):
        seen = found[instance]
        result.stop.append(instance)
        if seen.running:
            result.drain.append(instance)
        result.remove += seen.paths
    # a supervisor group of no process has no file; a systemd pool of none keeps its unit
    kept = {(manager, p.prefix) for p in pools if manager == 'systemd' or p.count > 0}
    for pool_key, paths in sorted(host.pool_files.items()):
        if pool_key not in kept:
            result.pools_gone.append(pool_key)
            result.remove += paths
    result.remove = sorted(set(result.remove))
    wanted_ids = {i.worker_id(host_id) for i in wanted}
    stale = {i.worker_id(host_id) for i in result.stop}
    ours = {key for key in host.keys if parse_worker_id(key, host_id) is not None}
    result.forget = sorted((ours | stale) - wanted_ids)
    return result
