#!/usr/bin/python
"""Find every arq worker instance on the host, whatever manages it, and bring them to the pools."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: arq_worker_instances
short_description: Reconcile a host's arq worker instances with its pools
description:
  - Finds every instance of the role on the host, whatever manages it (systemd units of every
    pool prefix, loaded or only on disk, with their enablement links and drop-ins; supervisor
    programs with their program and log files; this host's heartbeat keys, read only when the
    instances call for a change), plans the way to the pools under I(manager)
    (module_utils/arq_worker_plan.py) and applies it.
  - Instances not wanted are drained one at a time (SIGUSR1, wait until their heartbeat shows no
    running job, at most their pool's drain timeout), stopped and removed with their files and
    keys. New instances start and are waited for until their heartbeat reports their process. An
    instance whose process is older than its configuration (unit or program file, env file,
    current version) is drained and started again, one at a time. A change of manager drains
    each old instance before a new one starts in its place.
  - Check mode plans and reports, and changes nothing; C(--diff) shows the instances before and after.
  - Unit and program files are written before this runs (the role's templates); this module
    starts, stops and removes.
options:
  manager:
    description: The process manager the instances run under.
    type: str
    choices: [systemd, supervisor]
    required: true
  pools:
    description: The wanted pools, each C({prefix, count, drain_timeout}).
    type: list
    elements: dict
    required: true
  host_id:
    description: This host's part of the worker ids (C(<host_id>:<instance>)).
    type: str
    required: true
  drain_timeout:
    description: Drain timeout of an instance of a pool no longer configured.
    type: float
    default: 300
  restart_all:
    description:
      - Restart every wanted instance (the rolling restart), start the wanted ones that do not
        run, stop nothing.
    type: bool
    default: false
  heartbeat_timeout:
    description: Seconds a started instance has to report its process in its heartbeat.
    type: float
    default: 60
  home:
    description:
      - The role's home (C(current/bin/python -m flowworker.heartbeat_cli) reads and deletes the
        heartbeat keys).
    type: path
    required: true
  env_file:
    description: The workers' env file (C(REDIS_URL), TLS settings).
    type: path
    required: true
  unit_dir:
    description: Directory of the unit files, drop-ins and enablement links.
    type: path
    default: /etc/systemd/system
  supervisor_conf_dir:
    description: Directory of the program and group files.
    type: path
    default: /etc/supervisor/conf.d
  supervisor_socket:
    description: supervisord's socket (no socket, no supervisord).
    type: path
    default: /var/run/supervisor.sock
  log_dir:
    description: Directory of the supervisor programs' log files.
    type: path
    default: /var/log/arq-worker
author: flowworker team
"""

RETURN = r"""
plan:
  description:
    - Names of the instances to C(start), C(stop) and C(restart), the paths to C(remove), the
      worker ids to C(forget).
  type: dict
  returned: always
report:
  description: One line per thing done (or, in check mode, that would be done).
  type: list
  elements: str
  returned: always
"""

import contextlib
import dataclasses
import json
import os
import shutil
import time

from ansible.module_utils.arq_worker_plan import (
    MANAGERS,
    RUNNING,
    Found,
    Host,
    Pool,
    parse_instance,
    plan,
    supervisor_file_of,
    systemd_pool_of,
)
from ansible.module_utils.basic import AnsibleModule

SUPERVISOR_SYNC = '/usr/local/libexec/arq-worker/supervisor-sync'

# The verbs of each process manager ({target}: what systemctl or supervisorctl takes, {name}: the
# unit or program). Everything the module does to an instance goes through this table.
VERBS = {
    'systemd': {
        'list': [
            'systemctl',
            'list-units',
            '--all',
            '--plain',
            '--no-legend',
            '--full',
            'arq-worker@*',
            'arq-worker-*@*',
        ],
        'start': ['systemctl', 'enable', '--now', '{target}'],
        'stop': ['systemctl', 'stop', '{target}'],
        'quiet': ['systemctl', 'kill', '--kill-whom=main', '--signal=SIGUSR1', '{target}'],
        'pid': ['systemctl', 'show', '--property=MainPID', '--value', '{target}'],
        'state': ['systemctl', 'show', '--property=ActiveState,SubState,Result', '{target}'],
        'logs': ['journalctl', '--unit', '{target}', '--lines', '20', '--no-pager', '--output', 'cat'],
    },
    'supervisor': {
        'list': ['supervisorctl', 'status'],
        # supervisorctl start would wait startsecs (10 s) for each: the heartbeat is awaited instead
        'start': [SUPERVISOR_SYNC, '--start', '{target}'],
        'stop': ['supervisorctl', 'stop', '{target}'],
        'quiet': ['supervisorctl', 'signal', 'USR1', '{target}'],
        'pid': ['supervisorctl', 'pid', '{target}'],
        'state': ['supervisorctl', 'status', '{target}'],
        'logs': ['tail', '--lines', '20', '{log_dir}/{name}-error.log'],
    },
}
SHOW = ['systemctl', 'show', '--property=Id,LoadState,ActiveState,MainPID,NeedDaemonReload']


class Failed(Exception):
    """Stop here: the message names the instance and why."""


class Instances:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.report = []
        self.python = os.path.join(self.p['home'], 'current', 'bin', 'python')

    # --- running commands ----------------------------------------------------------------------

    def run(self, argv, check=True):
        rc, out, err = self.module.run_command(argv)
        if check and rc != 0:
            raise Failed('{} failed (rc {}): {}'.format(' '.join(argv), rc, (err or out).strip()))
        return rc, out

    def verb(self, verb, instance, check=True):
        argv = [
            arg.format(target=instance.target, name=instance.name, log_dir=self.p['log_dir'])
            for arg in VERBS[instance.manager][verb]
        ]
        return self.run(argv, check)

    def pid(self, instance):
        rc, out = self.verb('pid', instance, check=False)
        out = out.strip()
        return int(out) if rc == 0 and out.isdigit() else 0

    def heartbeat(self, *args):
        """``flowworker heartbeat ...`` of the installed version, without its worker stack: the JSON."""
        rc, out, err = self.module.run_command(
            [self.python, '-I', '-m', 'flowworker.heartbeat_cli', *args, '--env-file', self.p['env_file']]
        )
        try:
            answer = json.loads(out)
        except ValueError:
            answer = {}
        return rc, answer, (answer.get('msg') or err or out).strip()

    # --- finding what the host runs ------------------------------------------------------------

    def config_at(self, *paths):
        newest = 0.0
        for path in (*paths, self.p['env_file'], os.path.join(self.p['home'], 'current')):
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(path).st_mtime)
        return newest

    def find(self):
        instances = []
        pool_files = {}
        targets_up = set()
        self.needs_reload = False
        if os.path.isdir('/run/systemd/system') and shutil.which('systemctl'):
            instances += self.find_systemd(pool_files, targets_up)
        instances += self.find_supervisor(pool_files)
        return Host(
            instances=tuple(instances),
            pool_files={key: tuple(sorted(paths)) for key, paths in pool_files.items()},
            targets_up=frozenset(targets_up),
        )

    def keys(self):
        """The worker ids of this host's heartbeat keys (none while nothing is installed)."""
        if not (os.path.exists(self.python) and os.path.exists(self.p['env_file'])):
            return frozenset()
        rc, answer, why = self.heartbeat('list', '--match', self.p['host_id'] + ':arq-worker*')
        if rc != 0:
            self.module.warn('cannot list the heartbeat keys of this host: ' + why)
            return frozenset()
        return frozenset(answer.get('workers', {}))

    def find_systemd(self, pool_files, targets_up):
        unit_dir = self.p['unit_dir']
        paths = {}
        enabled = set()
        targets_enabled = set()
        for entry in _entries(unit_dir):
            instance = parse_instance(entry.name.removesuffix('.d'))
            prefix = systemd_pool_of(entry.name)
            if instance is not None:
                paths.setdefault(instance, []).append(entry.path)
            elif prefix is not None:
                pool_files.setdefault(('systemd', prefix), []).append(entry.path)
            if entry.name.endswith(('.wants', '.requires')) and entry.is_dir(follow_symlinks=False):
                for link in _entries(entry.path):
                    instance = parse_instance(link.name)
                    prefix = systemd_pool_of(link.name) if link.name.endswith('.target') else None
                    if instance is not None and instance.manager == 'systemd':
                        paths.setdefault(instance, []).append(link.path)
                        if entry.name == 'multi-user.target.wants':
                            enabled.add(instance)
                    elif prefix is not None:
                        pool_files.setdefault(('systemd', prefix), []).append(link.path)
                        if entry.name == 'multi-user.target.wants':
                            targets_enabled.add(prefix)
        _, listed = self.run(VERBS['systemd']['list'])
        loaded = {parse_instance(line.split()[0]) for line in listed.splitlines() if line.split()}
        names = sorted({i for i in (loaded | set(paths)) if i is not None and i.manager == 'systemd'})
        prefixes = sorted({i.prefix for i in names} | {p['prefix'] for p in self.p['pools']})
        units = [i.name for i in names] + [prefix + '.target' for prefix in prefixes]
        _, out = self.run(SHOW + units)
        shown = dict(zip(units, _show_blocks(out), strict=True))
        self.needs_reload = any(props.get('NeedDaemonReload') == 'yes' for props in shown.values())
        for prefix in prefixes:
            if prefix in targets_enabled and shown.get(prefix + '.target', {}).get('ActiveState') == 'active':
                targets_up.add(prefix)
        found = []
        for instance in names:
            props = shown.get(instance.name, {})
            state = props.get('ActiveState', 'inactive')
            running = state in RUNNING['systemd']
            if instance not in paths and not running and state != 'failed':
                continue
            unit = os.path.join(unit_dir, instance.prefix + '@.service')
            pid = int(props.get('MainPID') or 0)
            found.append(self.found(instance, running, pid, unit, paths, enabled=instance in enabled))
        return found

    def find_supervisor(self, pool_files):
        paths = {}
        for directory in (self.p['supervisor_conf_dir'], self.p['log_dir']):
            for entry in _entries(directory):
                owner = supervisor_file_of(entry.name)
                if owner is None:
                    continue
                prefix, instance = owner
                if instance is None:
                    if directory == self.p['supervisor_conf_dir']:
                        pool_files.setdefault(('supervisor', prefix), []).append(entry.path)
                else:
                    paths.setdefault(instance, []).append(entry.path)
        processes = {}
        self.supervisord = os.path.exists(self.p['supervisor_socket'])
        if self.supervisord:
            rc, out = self.run(VERBS['supervisor']['list'], check=False)
            if rc not in (0, 3):
                raise Failed(f'supervisorctl status failed (rc {rc}): {out.strip()}')
            for line in out.splitlines():
                fields = line.split()
                instance = parse_instance(fields[0]) if fields else None
                if instance is not None and instance.manager == 'supervisor':
                    pid = int(fields[3].rstrip(',')) if len(fields) > 3 and fields[2] == 'pid' else 0
                    processes[instance] = (fields[1], pid)
        found = []
        for instance in sorted(set(paths) | set(processes)):
            state, pid = processes.get(instance, ('STOPPED', 0))
            running = state in RUNNING['supervisor']
            program = os.path.join(self.p['supervisor_conf_dir'], instance.name + '.conf')
            found.append(self.found(instance, running, pid, program, paths))
        return found

    def found(self, instance, running, pid, config_file, paths, *, enabled=True):
        """What was found of ``instance``; ``config_file``: its unit or program file."""
        return Found(
            instance=instance,
            running=running,
            pid=pid,
            started_at=_started_at(pid) if running and pid else None,
            config_at=self.config_at(config_file),
            enabled=enabled,
            paths=tuple(sorted(paths.get(instance, ()))),
        )

    # --- doing it ------------------------------------------------------------------------------

    def drain(self, instance, timeout):
        """Quiet, wait until no job runs (at most ``timeout``), stop; (pid, seconds, jobs left)."""
        pid = self.pid(instance)
        seconds, left = 0.0, 0
        if pid:
            self.verb('quiet', instance)
            worker_id = instance.worker_id(self.p['host_id'])
            rc, answer, why = self.heartbeat('wait-idle', worker_id, '--timeout', str(timeout))
            if rc != 0:
                self.module.warn(f'{instance.name}: cannot follow its drain ({why}); stopping it')
            seconds = answer.get('elapsed', 0.0)
            if worker_id in answer.get('timed_out', []):
                left = ((answer.get('workers') or {}).get(worker_id) or {}).get('jobs', {}).get('running', 0)
        if pid or instance.manager == 'systemd':
            self.verb('stop', instance)
        return pid, seconds, left

    def start(self, instances):
        """Start them, then wait for each one's heartbeat from its new process; their pids."""
        for instance in instances:
            self.verb('start', instance)
        return [self.wait_healthy(instance) for instance in instances]

    def wait_healthy(self, instance):
        timeout = self.p['heartbeat_timeout']
        deadline = time.monotonic() + timeout
        pid = self.pid(instance)
        while not pid and time.monotonic() < deadline:
            time.sleep(0.5)
            pid = self.pid(instance)
        why = f'no PID within {timeout:g} s'
        if pid:
            left = max(1.0, deadline - time.monotonic())
            rc, _, why = self.heartbeat(
                'wait-pid', instance.worker_id(self.p['host_id']), '--pid', str(pid), '--timeout', f'{left:g}'
            )
            if rc == 0:
                return pid
        _, state = self.verb('state', instance, check=False)
        _, logs = self.verb('logs', instance, check=False)
        raise Failed(
            '{} on {} did not come back healthy: {}. State: {}. Last log lines: {}'.format(
                instance.name,
                self.p['host_id'],
                why.rstrip('.'),
                ', '.join(state.split()),
                ' | '.join(logs.splitlines()[-6:]),
            )
        )

    def sync_supervisor(self, prefixes):
        """Apply the program and group files to supervisord's groups (new programs stay stopped)."""
        if prefixes and self.supervisord:
            self.run([SUPERVISOR_SYNC, *sorted(set(prefixes))])

    def reload_systemd(self):
        if self.needs_reload:
            self.run(['systemctl', 'daemon-reload'])
            self.needs_reload = False

    def apply(self, todo):
        manager = todo.manager
        if manager == 'systemd':
            self.reload_systemd()
            for prefix in todo.targets:
                self.run(['systemctl', 'enable', '--now', prefix + '.target'])
                self.report.append(f'{prefix}.target: enabled and started')
        elif todo.start or todo.restart:
            self.sync_supervisor(i.prefix for i in todo.start + todo.restart)
        for step in todo.steps():
            instance = step.instances[0]
            if step.verb == 'drain':
                pid, seconds, left = self.drain(instance, todo.drain_timeouts[instance.name])
                self.report.append(
                    f'{instance.name}: {_drained(pid, seconds, left)}, stopped'
                    if pid
                    else f'{instance.name}: was not running, stopped'
                )
            elif step.verb == 'start':
                for started, pid in zip(step.instances, self.start(step.instances), strict=True):
                    self.report.append(f'{started.name}: started, pid {pid}; heartbeat running')
            else:
                pid, seconds, left = self.drain(instance, todo.drain_timeouts[instance.name])
                if manager == 'supervisor':
                    self.sync_supervisor([instance.prefix])
                (new,) = self.start([instance])
                did = f'{_drained(pid, seconds, left)}, stopped, started; pid {pid} -> {new}'
                if not pid:
                    did = f'was not running; started, pid {new}'
                self.report.append(f'{instance.name}: {did}; heartbeat running')
        for instance in todo.enable:
            self.run(['systemctl', 'enable', instance.name])
            self.report.append(f'{instance.name}: enabled')
        self.remove(todo)

    def remove(self, todo):
        gone = [prefix for manager, prefix in todo.pools_gone if manager == 'systemd']
        for prefix in gone:
            self.run(['systemctl', 'disable', '--now', prefix + '.target'], check=False)
        for path in todo.remove:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        if todo.remove:
            self.report.append('removed {}'.format(', '.join(todo.remove)))
        stopped = [i for i in todo.stop if i.manager == 'systemd']
        if stopped or gone:
            self.needs_reload = True
            self.reload_systemd()
            self.run(['systemctl', 'reset-failed', *[i.name for i in stopped]], check=False)
        self.sync_supervisor(
            [i.prefix for i in todo.stop if i.manager == 'supervisor']
            + [prefix for manager, prefix in todo.pools_gone if manager == 'supervisor']
        )
        if todo.forget:
            if not os.path.exists(self.python):
                return
            rc, answer, why = self.heartbeat('delete', *todo.forget)
            if rc != 0:
                raise Failed('cannot delete the heartbeat keys {}: {}'.format(', '.join(todo.forget), why))
            if answer.get('deleted'):
                self.report.append('deleted the heartbeat keys of {}'.format(', '.join(answer['deleted'])))

    def would(self, todo):
        """Check mode: what a run would do."""
        lines = []
        for step in todo.steps():
            instance = step.instances[0]
            drain = f'would quiet it, drain it (at most {todo.drain_timeouts[instance.name]:g} s)'
            if step.verb == 'drain':
                lines.append(f'{instance.name}: {drain} and stop it')
            elif step.verb == 'start':
                lines += [f'{i.name}: would start it' for i in step.instances]
            else:
                pid = self.pid(instance)
                would = f'{drain}, stop and start it; pid {pid}' if pid else 'not running; would start it'
                lines.append(f'{instance.name}: {would}')
        lines += [f'{p}.target: would enable and start it' for p in todo.targets]
        lines += [f'{i.name}: would enable it' for i in todo.enable]
        if todo.remove:
            lines.append('would remove {}'.format(', '.join(todo.remove)))
        if todo.forget:
            lines.append('would delete the heartbeat keys of {}'.format(', '.join(todo.forget)))
        self.report += lines


def _entries(directory):
    try:
        return sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError:
        return []


def _show_blocks(out):
    """``systemctl show`` of several units: one dict per unit, in the order asked."""
    blocks = []
    for chunk in out.strip().split('\n\n'):
        props = {}
        for line in chunk.splitlines():
            key, _, value = line.partition('=')
            props[key] = value
        blocks.append(props)
    return blocks


def _started_at(pid):
    """Wall-clock start of process ``pid`` (from /proc, to the clock tick), None if gone."""
    try:
        with open(f'/proc/{pid}/stat') as handle:
            stat = handle.read()
        with open('/proc/uptime') as handle:
            uptime = float(handle.read().split()[0])
    except OSError:
        return None
    ticks = int(stat[stat.rindex(')') + 2 :].split()[19])
    return time.time() - (uptime - ticks / os.sysconf('SC_CLK_TCK'))


def _drained(pid, seconds, left):
    jobs = 'no job left'
    if left:
        jobs = (
            f'{left} jobs still running when the drain timed out, given the drain timeout once more on stop'
        )
    return f'drained in {seconds} s ({jobs})'


def main():
    module = AnsibleModule(
        argument_spec={
            'manager': {'type': 'str', 'required': True, 'choices': list(MANAGERS)},
            'pools': {'type': 'list', 'elements': 'dict', 'required': True},
            'host_id': {'type': 'str', 'required': True},
            'drain_timeout': {'type': 'float', 'default': 300},
            'restart_all': {'type': 'bool', 'default': False},
            'heartbeat_timeout': {'type': 'float', 'default': 60},
            'home': {'type': 'path', 'required': True},
            'env_file': {'type': 'path', 'required': True},
            'unit_dir': {'type': 'path', 'default': '/etc/systemd/system'},
            'supervisor_conf_dir': {'type': 'path', 'default': '/etc/supervisor/conf.d'},
            'supervisor_socket': {'type': 'path', 'default': '/var/run/supervisor.sock'},
            'log_dir': {'type': 'path', 'default': '/var/log/arq-worker'},
        },
        supports_check_mode=True,
    )
    params = module.params
    instances = Instances(module)
    try:
        pools = [Pool(str(p['prefix']), int(p['count']), float(p['drain_timeout'])) for p in params['pools']]
    except (KeyError, TypeError, ValueError) as exc:
        module.fail_json(msg=f'pools: each pool needs prefix, count and drain_timeout ({exc})')
    options = {'default_drain_timeout': params['drain_timeout'], 'restart_all': params['restart_all']}
    try:
        host = instances.find()
        todo = plan(params['manager'], pools, host, params['host_id'], **options)
        if todo.changes:
            host = dataclasses.replace(host, keys=instances.keys())
            todo = plan(params['manager'], pools, host, params['host_id'], **options)
    except Failed as exc:
        module.fail_json(msg=str(exc))
    result = {'changed': todo.changes, 'plan': todo.as_dict(), 'report': instances.report}
    if module._diff and todo.changes:
        running = sorted(f.instance for f in host.instances if f.running)
        wanted = sorted(i for pool in pools for i in pool.instances(params['manager']))
        result['diff'] = {
            'before_header': 'instances running',
            'after_header': 'instances wanted',
            'before': ''.join(i.name + '\n' for i in running),
            'after': ''.join(i.name + '\n' for i in wanted),
        }
    if module.check_mode:
        instances.would(todo)
        module.exit_json(**result)
    try:
        instances.apply(todo)
    except Failed as exc:
        module.fail_json(msg=str(exc), **result)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
