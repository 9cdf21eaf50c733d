"""The sandbox of the project's services, as systemd [Service] directives: one definition for every unit.

``{{ [arq_worker_log_dir] | flowworker.fleet.systemd_sandbox }}`` gives the directives, one per line,
with the paths the service may write (``ReadWritePaths``); ``bind_service=true`` keeps the one
capability a port below 1024 needs, and then no user namespace of its own (its capabilities would
not reach the host's network stack).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SANDBOX = (
    'NoNewPrivileges=yes',
    'ProtectSystem=strict',
    'ProtectHome=yes',
    'PrivateTmp=yes',
    'PrivateDevices=yes',
    'ProtectKernelTunables=yes',
    'ProtectKernelModules=yes',
    'ProtectKernelLogs=yes',
    'ProtectControlGroups=yes',
    'ProtectClock=yes',
    'ProtectHostname=yes',
    'RestrictSUIDSGID=yes',
    'RestrictRealtime=yes',
    'RestrictNamespaces=yes',
    'LockPersonality=yes',
    'CapabilityBoundingSet={capabilities}',
    'SystemCallArchitectures=native',
    'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6',
    'SystemCallFilter=@system-service',
    'SystemCallFilter=~@privileged @resources',
    'SystemCallErrorNumber=EPERM',
    'MemoryDenyWriteExecute=yes',
    'ProtectProc=invisible',
    'ProcSubset=pid',
    'PrivateUsers=yes',
    'RemoveIPC=yes',
    'DevicePolicy=closed',
)


def systemd_sandbox(read_write_paths: Any, bind_service: bool = False) -> str:
    lines = [
        line.format(capabilities='CAP_NET_BIND_SERVICE' if bind_service else '')
        for line in SANDBOX
        if not (bind_service and line == 'PrivateUsers=yes')
    ]
    paths = [str(path) for path in read_write_paths or [] if path]
    if paths:
        lines.append(f'ReadWritePaths={" ".join(paths)}')
    return '\n'.join(lines)


class FilterModule:
    def filters(self) -> dict[str, Callable[..., str]]:
        return {'systemd_sandbox': systemd_sandbox}
