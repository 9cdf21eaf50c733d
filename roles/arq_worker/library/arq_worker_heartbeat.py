#!/usr/bin/python
"""Read, wait for and delete flowworker heartbeat keys (``arq:worker:<worker-id>``)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: arq_worker_heartbeat
short_description: Read, wait for and delete flowworker heartbeat keys
description:
  - Talks to the Redis that the workers use, with the C(REDIS_URL) read from the workers' env file on
    the host, so no secret passes through Ansible. A C(rediss://) URL is verified against the env
    file's C(REDIS_TLS_CA_CERTS) when it names one, as the workers verify it.
  - Must run with the worker virtualenv's python (it imports C(redis)), e.g.
    C(vars: ansible_python_interpreter: /opt/arq-worker/current/bin/python).
options:
  env_file:
    description: Env file that holds C(REDIS_URL) (and C(REDIS_TLS_CA_CERTS) for TLS).
    type: path
    required: true
  action:
    description:
      - C(list) returns the heartbeats whose worker id matches I(match).
      - C(wait_idle) waits until every key in I(ids) is gone or reports a state other than C(running)
        (the process was quieted and picks no more jobs) and C(jobs.running == 0).
      - C(wait_pid) waits until the key of I(ids[0]) reports I(pid) with C(state=running).
      - C(delete) deletes the keys in I(ids).
    type: str
    choices: [list, wait_idle, wait_pid, delete]
    required: true
  match:
    description: Glob on the worker id for C(list).
    type: str
    default: '*'
  ids:
    description: Worker ids.
    type: list
    elements: str
    default: []
  pid:
    description: Process id the heartbeat must report (C(wait_pid)).
    type: int
  timeout:
    description: Seconds to wait (C(wait_idle), C(wait_pid)).
    type: float
    default: 60
author: flowworker team
"""

RETURN = r"""
workers:
  description: Heartbeat payloads by worker id (C(list)), or the last payloads seen (C(wait_*)).
  type: dict
  returned: always
timed_out:
  description: Worker ids that did not reach the awaited state in time (C(wait_idle)).
  type: list
  returned: always
deleted:
  description: Keys deleted (or that would be deleted in check mode).
  type: list
  returned: always
elapsed:
  description: Seconds the module waited (C(wait_idle), C(wait_pid)).
  type: float
  returned: always
"""

import json
import time

from ansible.module_utils.basic import AnsibleModule

KEY_PREFIX = 'arq:worker:'


def read_env_file(path):
    values = {}
    with open(path, encoding='utf-8') as handle:
        for raw in handle:
            line = raw.strip()
            if not line or line.startswith('#') or '=' not in line:
                continue
            key, _, value = line.partition('=')
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in '"\'':
                value = value[1:-1]
            values[key.strip()] = value
    return values


def load(client, worker_id):
    raw = client.get(KEY_PREFIX + worker_id)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {'raw': raw.decode('utf-8', 'replace') if isinstance(raw, bytes) else raw}


def main():
    module = AnsibleModule(
        argument_spec={
            'env_file': {'type': 'path', 'required': True},
            'action': {
                'type': 'str',
                'required': True,
                'choices': ['list', 'wait_idle', 'wait_pid', 'delete'],
            },
            'match': {'type': 'str', 'default': '*'},
            'ids': {'type': 'list', 'elements': 'str', 'default': []},
            'pid': {'type': 'int'},
            'timeout': {'type': 'float', 'default': 60},
        },
        required_if=[('action', 'wait_pid', ('pid', 'ids'))],
        supports_check_mode=True,
    )
    try:
        import redis
    except ImportError:
        module.fail_json(
            msg='the python running this module has no redis package: run it with the worker virtualenv'
        )
    params = module.params
    try:
        env = read_env_file(params['env_file'])
    except OSError as exc:
        module.fail_json(msg='cannot read {}: {}'.format(params['env_file'], exc))
    url = env.get('REDIS_URL')
    if not url:
        module.fail_json(msg='REDIS_URL is not set in {}'.format(params['env_file']))
    tls = {}
    if url.startswith('rediss://') and env.get('REDIS_TLS_CA_CERTS'):
        tls['ssl_ca_certs'] = env['REDIS_TLS_CA_CERTS']
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10, **tls)
    result = {'changed': False, 'workers': {}, 'timed_out': [], 'deleted': [], 'elapsed': 0.0}
    action = params['action']
    started = time.monotonic()
    deadline = started + params['timeout']
    try:
        if action == 'list':
            for key in client.scan_iter(match=KEY_PREFIX + params['match'], count=500):
                worker_id = (key.decode() if isinstance(key, bytes) else key)[len(KEY_PREFIX) :]
                payload = load(client, worker_id)
                if payload is not None:
                    result['workers'][worker_id] = payload
        elif action == 'wait_idle':
            pending = list(params['ids'])
            while True:
                still = []
                for worker_id in pending:
                    payload = load(client, worker_id)
                    result['workers'][worker_id] = payload
                    # idle: gone, or quiet (no longer `running`, so it picks no more jobs) with none left
                    if payload is not None and (
                        payload.get('state') == 'running' or payload.get('jobs', {}).get('running', 0) > 0
                    ):
                        still.append(worker_id)
                pending = still
                if not pending or time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
            result['timed_out'] = pending
        elif action == 'wait_pid':
            worker_id = params['ids'][0]
            while True:
                payload = load(client, worker_id)
                result['workers'][worker_id] = payload
                if (
                    payload is not None
                    and payload.get('pid') == params['pid']
                    and payload.get('state') == 'running'
                ):
                    break
                if time.monotonic() >= deadline:
                    last = (
                        'none'
                        if payload is None
                        else 'pid {} in state {}'.format(payload.get('pid'), payload.get('state'))
                    )
                    module.fail_json(
                        msg='no heartbeat from {} with pid {} within {:g} s (last heartbeat: {})'.format(
                            worker_id, params['pid'], params['timeout'], last
                        ),
                        **result,
                    )
                time.sleep(0.25)
        elif action == 'delete':
            keys = [KEY_PREFIX + worker_id for worker_id in params['ids']]
            present = [key for key in keys if client.exists(key)]
            result['deleted'] = present
            result['changed'] = bool(present)
            if present and not module.check_mode:
                client.delete(*present)
    except redis.RedisError as exc:
        module.fail_json(msg=f'redis: {exc}', **result)
    result['elapsed'] = round(time.monotonic() - started, 2)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
