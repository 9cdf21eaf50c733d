"""The one place that derives what the role needs to know about a worker instance from its name."""

from __future__ import annotations

import re

# a unit `<prefix>@<n>.service` or a supervisor program `<prefix>_<nn>`
UNIT = re.compile(r'^(?P<prefix>arq-worker(?:-[a-z0-9_]+)?)@(?P<n>[^.]+)\.service$')
PROGRAM = re.compile(r'^(?P<prefix>arq-worker(?:-[a-z0-9_]+)?)_(?P<n>[0-9]+)$')


def arq_worker_instances(names, host_id, manager, pools, drain_timeout):
    """Instances by name: unit or program `name`, worker `id` (its heartbeat key is
    arq:worker:<id>), the `target` that systemctl or supervisorctl takes, its pool's `prefix`,
    and the `drain_timeout` of its pool (`drain_timeout` for an instance of no configured pool).
    """
    pattern = UNIT if manager == 'systemd' else PROGRAM
    drains = {pool['prefix']: pool['drain_timeout'] for pool in pools}
    out = []
    for name in names:
        match = pattern.match(name)
        if match is None:
            raise ValueError(f'{name!r} is not the name of an arq_worker {manager} instance')
        prefix = match['prefix']
        out.append(
            {
                'name': name,
                'id': f'{host_id}:{name.removesuffix(".service")}',
                'target': name if manager == 'systemd' else f'{prefix}:{name}',
                'prefix': prefix,
                'drain_timeout': float(drains.get(prefix, drain_timeout)),
            }
        )
    return out


class FilterModule:
    def filters(self):
        return {'arq_worker_instances': arq_worker_instances}
