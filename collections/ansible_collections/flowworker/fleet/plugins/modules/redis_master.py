#!/usr/bin/python
"""Find the Redis master of a replicated data set and record it in a node's start-up state."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: redis_master
short_description: Find the current Redis master and record it where Redis and Sentinel start from
description:
  - Decides which node of a replicated Redis data set is the master now, in this order, what the
    Redis Sentinels say (the address most of the answering sentinels name), else what the data
    nodes themselves say (the first that reports the master role), else the first of I(nodes),
    the master of a data set deployed for the first time. A failover is therefore followed, never
    undone; the roles do not force the first node back.
  - Records it in the state file the server starts from, a file Redis and Sentinel rewrite
    themselves (CONFIG REWRITE after a failover); the role's own settings are included after it on
    the command line, so they win. For I(kind=server) the file holds C(replicaof) on a replica and
    nothing on the master; it is written when it is missing, or with I(rewrite) (before a restart
    the role makes, which also drops what CONFIG REWRITE copied into it). For I(kind=sentinel) it
    holds C(sentinel monitor), written when the file does not monitor I(master_name) yet (Debian's
    package ships one that monitors C(mymaster)); afterwards Sentinel owns it, and a changed
    I(quorum) is set on the running sentinel with C(SENTINEL SET).
  - Check mode reports what would change; C(--diff) shows the state file's comments and its
    replication or monitor lines alone (CONFIG REWRITE copies C(masterauth) into it).
  - A data node that ran (its state file exists) and that neither the sentinels nor the node
    itself answer for keeps its state file as it is, even with I(rewrite); the first of
    I(nodes) is the master of a data set that never started, not of one whose sentinels are
    unreachable.
options:
  kind:
    description: C(server) for a Redis data node, C(sentinel) for a Redis Sentinel.
    type: str
    choices: [server, sentinel]
    required: true
  state_file:
    description: The file Redis or Sentinel is started with (owner and group C(redis), mode C(0640)).
    type: path
    required: true
  nodes:
    description: The data nodes as C(address:port), the first the master of a new data set.
    type: list
    elements: str
    required: true
  address:
    description:
      - This host's own C(address:port) as the others reach it, the data node's (I(kind=server))
        or the sentinel's (I(kind=sentinel)).
    type: str
    required: true
  sentinels:
    description: The sentinels to ask, C(address:port).
    type: list
    elements: str
    default: []
  master_name:
    description: The name the sentinels know the master by.
    type: str
    required: true
  sentinel_password:
    description: The sentinels' own password (C(requirepass)), empty for none.
    type: str
    default: ''
    no_log: true
  node_user:
    description: The user the nodes are asked as (C(ROLE)); empty for the default user.
    type: str
    default: ''
  node_password:
    description: That user's password, empty for none.
    type: str
    default: ''
    no_log: true
  node_cli:
    description:
      - C(redis-cli)'s options to reach a data node, C(-h) and C(-p) left out (TLS options, for
        instance). With I(kind=server) only this node itself is asked.
    type: list
    elements: str
    default: []
  sentinel_cli:
    description: C(redis-cli)'s options to reach the sentinels, C(-h) and C(-p) left out (TLS options).
    type: list
    elements: str
    default: []
  quorum:
    description: The sentinels that must agree that the master is down (I(kind=sentinel)).
    type: int
    default: 2
  rewrite:
    description: Write the state file of a data node even when it exists (before a restart).
    type: bool
    default: false
author: flowworker team
"""

EXAMPLES = r"""
- name: Record this node's master before the restart
  flowworker.fleet.redis_master:
    kind: server
    state_file: /etc/redis/redis-state.conf
    nodes: [redis-1:6379, redis-2:6379, redis-3:6379]
    address: redis-2:6379
    sentinels: [redis-1:26379, redis-2:26379, redis-3:26379]
    master_name: flowworker
    sentinel_password: "{{ vault_redis_sentinel_password }}"
    node_user: admin
    node_password: "{{ vault_redis_admin_password }}"
    rewrite: true
"""

RETURN = r"""
master:
  description: The master's C(address:port).
  returned: always
  type: str
source:
  description: Who named it, C(sentinels), C(nodes) or C(inventory) (the first of I(nodes)).
  returned: always
  type: str
"""

import collections
import grp
import os
import pwd
import re
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ansible.module_utils.basic import AnsibleModule

HEADER = '# Written by the role at the first start and before each restart it makes; Redis rewrites it.\n'
TIMEOUT = 5
ERROR = re.compile(r'(ERR|[A-Z]{4,}) ')


def split_address(address: str) -> tuple[str, str]:
    """``host:port`` (``[::1]:6379`` for IPv6) as host and port."""
    host, _, port = address.rpartition(':')
    return host.removeprefix('[').removesuffix(']'), port


def ask(cli: Sequence[str], address: str, password: str, *command: str) -> list[str] | None:
    """One command's answer as redis-cli prints it raw, a line an element; None when none came."""
    host, port = split_address(address)
    env = {**os.environ, 'REDISCLI_AUTH': password} if password else None
    try:
        done = subprocess.run(
            ['redis-cli', '--no-auth-warning', '--raw', '-h', host, '-p', port, *cli, *command],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.splitlines()
    # an error reply (NOAUTH, WRONGPASS, NOPERM ...) is no answer either, nor one given after a
    # failed AUTH (redis-cli then goes on as the default user: a Redis not yet configured, say)
    if done.returncode != 0 or not lines or ERROR.match(lines[0]) or 'AUTH failed' in done.stderr:
        return None
    return lines


def master_of(answers: Sequence[str | None]) -> str | None:
    """The address most answers name (the first named among equals); None if none answered."""
    named = [answer for answer in answers if answer]
    if not named:
        return None
    counts = collections.Counter(named)
    return max(named, key=lambda answer: (counts[answer], -named.index(answer)))


def sentinel_answer(lines: list[str] | None) -> str | None:
    """``SENTINEL GET-MASTER-ADDR-BY-NAME``'s host and port as ``host:port``."""
    if lines is None or len(lines) != 2 or not lines[1].isdigit():
        return None
    host = f'[{lines[0]}]' if ':' in lines[0] else lines[0]
    return f'{host}:{lines[1]}'


def role_answer(lines: list[str] | None, address: str) -> str | None:
    """The master a node's ``ROLE`` names: itself as master, or the master it replicates."""
    if not lines:
        return None
    if lines[0] == 'master':
        return address
    if lines[0] == 'slave' and len(lines) >= 3 and lines[2].isdigit():
        return sentinel_answer(lines[1:3])
    return None


def state_content(kind: str, master: str, address: str, master_name: str, quorum: int) -> str:
    host, port = split_address(master)
    if kind == 'sentinel':
        return f'{HEADER}sentinel monitor {master_name} {host} {port} {quorum}\n'
    return HEADER + ('' if master == address else f'replicaof {host} {port}\n')


def monitors(content: str, master_name: str) -> bool:
    return any(line.split()[:3] == ['sentinel', 'monitor', master_name] for line in content.splitlines())


def _public(content: str) -> str:
    """A state file's comments and its replication and monitor lines, never a password."""
    kept = ('#', 'replicaof ', 'slaveof ', 'sentinel monitor ')
    return ''.join(line for line in content.splitlines(keepends=True) if line.startswith(kept))


def _read(path: str) -> str | None:
    try:
        with open(path, encoding='utf-8') as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _write(path: str, content: str) -> None:
    """Replace the file at once, redis:redis 0640 (Redis rewrites it as that user)."""
    uid, gid = pwd.getpwnam('redis').pw_uid, grp.getgrnam('redis').gr_gid
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.redis_master.')
    try:
        os.fchown(descriptor, uid, gid)
        os.fchmod(descriptor, 0o640)
        with os.fdopen(descriptor, 'w', encoding='utf-8') as handle:
            handle.write(content)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


ARGUMENTS: dict[str, Any] = {
    'kind': {'type': 'str', 'choices': ['server', 'sentinel'], 'required': True},
    'state_file': {'type': 'path', 'required': True},
    'nodes': {'type': 'list', 'elements': 'str', 'required': True},
    'address': {'type': 'str', 'required': True},
    'sentinels': {'type': 'list', 'elements': 'str', 'default': []},
    'master_name': {'type': 'str', 'required': True},
    'sentinel_password': {'type': 'str', 'default': '', 'no_log': True},
    'node_user': {'type': 'str', 'default': ''},
    'node_password': {'type': 'str', 'default': '', 'no_log': True},
    'node_cli': {'type': 'list', 'elements': 'str', 'default': []},
    'sentinel_cli': {'type': 'list', 'elements': 'str', 'default': []},
    'quorum': {'type': 'int', 'default': 2},
    'rewrite': {'type': 'bool', 'default': False},
}


def _ask_nodes(p: dict[str, Any]) -> str | None:
    """A data node asks itself (its master, or itself); a sentinel asks the nodes which is master."""
    auth = ['--user', p['node_user']] if p['node_user'] else []

    def role(node: str) -> str | None:
        return role_answer(ask([*auth, *p['node_cli']], node, p['node_password'], 'ROLE'), node)

    if p['kind'] == 'server':
        # only a node started from its state file runs this role's configuration
        return role(p['address']) if os.path.exists(p['state_file']) else None
    # the first node that says it is the master itself
    return next((node for node in p['nodes'] if role(node) == node), None)


def run(module: AnsibleModule) -> dict[str, Any]:
    p = module.params
    command = ('SENTINEL', 'GET-MASTER-ADDR-BY-NAME', p['master_name'])

    def answer(sentinel: str) -> str | None:
        return sentinel_answer(ask(p['sentinel_cli'], sentinel, p['sentinel_password'], *command))

    # all at once: a sentinel that does not answer (or a plain one asked over TLS) costs TIMEOUT once
    with ThreadPoolExecutor(max_workers=max(len(p['sentinels']), 1)) as pool:
        answers = list(pool.map(answer, p['sentinels']))
    master, source = master_of(answers), 'sentinels'
    if master is None:
        master, source = _ask_nodes(p), 'nodes'
    if master is None:
        master, source = p['nodes'][0], 'inventory'
    result: dict[str, Any] = {'changed': False, 'master': master, 'source': source}

    before = _read(p['state_file'])
    wanted = state_content(p['kind'], master, p['address'], p['master_name'], p['quorum'])
    if p['kind'] == 'server':
        # with no answer from the sentinels nor from the node, a node that ran keeps what Redis
        # last wrote: the inventory's first node is only the master of a data set never started
        known = source != 'inventory' or before is None
        write = before is None or (p['rewrite'] and known and before != wanted)
    else:
        write = before is None or not monitors(before, p['master_name'])
    if write:
        result['changed'] = True
        path = p['state_file']
        result['diff'] = {
            # CONFIG REWRITE copies masterauth there: the diff shows the replication lines alone
            'before': _public(before or ''),
            'after': wanted,
            'before_header': path,
            'after_header': path,
        }
        if not module.check_mode:
            _write(p['state_file'], wanted)
    elif p['kind'] == 'sentinel':
        result['changed'] = _set_quorum(module)
    return result


def _set_quorum(module: AnsibleModule) -> bool:
    """SENTINEL SET the quorum on this host's running sentinel when it differs."""
    p = module.params
    sentinel, name, quorum = p['address'], p['master_name'], str(p['quorum'])
    cli = p['sentinel_cli']
    lines = ask(cli, sentinel, p['sentinel_password'], 'SENTINEL', 'MASTER', name)
    fields = dict(zip(lines[::2], lines[1::2], strict=False)) if lines else {}
    # not running (it starts with the state file's quorum) or the same quorum
    if fields.get('quorum', quorum) == quorum:
        return False
    if module.check_mode:
        return True
    if ask(cli, sentinel, p['sentinel_password'], 'SENTINEL', 'SET', name, 'quorum', quorum) != ['OK']:
        module.fail_json(msg=f'the sentinel at {sentinel} refused SENTINEL SET {name} quorum {quorum}')
    return True


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENTS, supports_check_mode=True)
    module.exit_json(**run(module))


if __name__ == '__main__':
    main()
