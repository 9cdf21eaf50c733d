"""supervisord RPC extension: change a process group's members without restarting the others.

``supervisorctl update`` replaces a whole group when its configuration changed — adding one
[program:] to a [group:] (or changing numprocs) stops and restarts every process in it. This
extension adds ``arq_worker.syncGroup(name)``: it re-reads the configuration files and brings
the running group ``name`` in line with them process by process:

- processes new in the configuration are added, stopped (the caller starts them, in its own
  order: supervisord's autostart applies when it starts, not to processes added here);
- processes gone from the configuration are removed if they are stopped (stop them first);
- processes whose configuration changed are replaced if they are stopped, else reported in
  ``stale`` (the caller restarts them: stop, syncGroup, start);
- a group gone from the configuration is removed once all its processes are stopped.

Processes that stay are never touched. Installed by the arq_worker Ansible role with

    [rpcinterface:arq_worker]
    supervisor.rpcinterface_factory = arq_worker_supervisor:make_rpcinterface
"""

from supervisor.states import STOPPED_STATES
from supervisor.xmlrpc import Faults, RPCError

API_VERSION = '1.0'


class ArqWorkerNamespaceRPCInterface:
    def __init__(self, supervisord):
        self.supervisord = supervisord

    def getAPIVersion(self):
        """Version of this extension's API."""
        return API_VERSION

    def syncGroup(self, name):
        """Apply the configuration on disk to group ``name`` process by process.

        @param string name  group name
        @return struct      {added, removed, replaced, stale, group_added, group_removed}
        """
        supervisord = self.supervisord
        try:
            supervisord.options.process_config(do_usage=False)
        except ValueError as exc:
            raise RPCError(Faults.CANT_REREAD, str(exc)) from exc
        result = {
            'added': [],
            'removed': [],
            'replaced': [],
            'stale': [],
            'group_added': False,
            'group_removed': False,
        }
        configs = {config.name: config for config in supervisord.options.process_group_configs}
        new = configs.get(name)
        group = supervisord.process_groups.get(name)
        if group is None:
            if new is not None:
                supervisord.add_process_group(new)
                for process in supervisord.process_groups[name].processes.values():
                    _hold(process)
                result['group_added'] = True
                result['added'] = sorted(p.name for p in new.process_configs)
            return result
        if new is None:
            running = [p.config.name for p in group.processes.values() if p.get_state() not in STOPPED_STATES]
            if running:
                raise RPCError(
                    Faults.STILL_RUNNING, '{}: stop {} first'.format(name, ', '.join(sorted(running)))
                )
            supervisord.remove_process_group(name)
            result['group_removed'] = True
            result['removed'] = sorted(group.processes)
            return result
        wanted = {pconfig.name: pconfig for pconfig in new.process_configs}
        for pname in sorted(set(group.processes) - set(wanted)):
            if group.processes[pname].get_state() not in STOPPED_STATES:
                result['stale'].append(pname)
                continue
            del group.processes[pname]
            result['removed'].append(pname)
        for pname, pconfig in sorted(wanted.items()):
            process = group.processes.get(pname)
            if process is not None and process.config == pconfig:
                continue
            if process is not None and process.get_state() not in STOPPED_STATES:
                result['stale'].append(pname)
                continue
            pconfig.create_autochildlogs()
            group.processes[pname] = _hold(pconfig.make_process(group))
            result['replaced' if process is not None else 'added'].append(pname)
        if not result['stale']:
            group.config = new
        return result


def _hold(process):
    """Keep supervisord from autostarting ``process``: it autostarts a stopped process that was
    never started (``laststart`` 0); ``startProcess`` starts it as usual."""
    process.laststart = 1
    return process


def make_rpcinterface(supervisord, **config):
    return ArqWorkerNamespaceRPCInterface(supervisord)
