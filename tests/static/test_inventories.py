"""The example inventories parse, decrypt with the documented password, and wire the stack together."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from ..conftest import ROOT

EXAMPLE_VAULT_PASSWORD = 'example-only'  # README, "Secrets"


def host_vars(inventory: str, host: str, password_file: Path, *names: str, extra: str = '') -> dict[str, str]:
    """Variables as a play on ``host`` sees them (playbooks/group_vars included), without contacting it;
    ``inventory`` may name several, ``lab+lab-ha``, given in that order; ``extra``: ``-e`` of them."""
    expression = '{' + ','.join(f"'{name}':{name}" for name in names) + '}'  # one word for -a
    sources = [arg for name in inventory.split('+') for arg in ('-i', f'inventories/{name}')]
    result = subprocess.run(
        [
            'ansible',
            *sources,
            '--playbook-dir',
            'playbooks',
            host,
            '-m',
            'ansible.builtin.debug',
            '-a',
            f'var={expression}',
            '--vault-password-file',
            str(password_file),
            *(['-e', extra] if extra else []),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={
            **os.environ,
            'ANSIBLE_LOAD_CALLBACK_PLUGINS': '1',
            'ANSIBLE_STDOUT_CALLBACK': 'ansible.posix.json',
        },
    )
    # profile_tasks (ansible.cfg) prints its time stamps around the report
    report, _ = json.JSONDecoder().raw_decode(result.stdout, result.stdout.index('{'))
    return {
        name: str(value) for name, value in report['plays'][0]['tasks'][0]['hosts'][host][expression].items()
    }


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / 'vault-password'
    path.write_text(EXAMPLE_VAULT_PASSWORD + '\n')
    return path


@pytest.mark.parametrize(
    ('inventory', 'hosts', 'expected'),
    [
        (
            'production',
            ('worker-1.prod.example.internal', 'ops-1.prod.example.internal'),
            (
                r'postgresql://flow_ROLE:production-ROLE[\w-]+@pg-1.prod.example.internal:5432/flows\?sslmode=verify-full',
                r'rediss://ROLE:production-redis-ROLE-\w+@redis-1.prod.example.internal:6380/0',
                # the CA the servers name (group_vars/redis_servers.yml, postgresql_servers.yml)
                '/etc/ssl/flowworker/ca.crt',
            ),
        ),
        (
            'staging',
            ('worker-2.staging.example.internal', 'data-1.staging.example.internal'),
            (
                r'postgresql://flow_ROLE:staging-ROLE[\w-]+@data-1.staging.example.internal:5432/flows',
                r'redis://ROLE:staging-redis-ROLE-\w+@data-1.staging.example.internal:6379/0',
                '',
            ),
        ),
    ],
)
def test_the_dsns_the_cas_and_the_monitor_token_come_from_the_inventory_and_its_vault(
    inventory: str,
    hosts: tuple[str, str],
    expected: tuple[str, str, str],
    password_file: Path,
) -> None:
    worker, monitor = hosts
    database_url, redis_url, ca_file = expected
    # the monitor reads with PostgreSQL's read-only monitor role; its token is in its group's own vault file
    for host, prefix, role in ((worker, 'arq_worker', 'worker'), (monitor, 'arq_monitor', 'monitor')):
        tokens = ('arq_monitor_token', 'arq_monitor_read_token') if prefix == 'arq_monitor' else ()
        urls = ('database_url', 'redis_url', 'database_ca_file', 'redis_ca_file')
        seen = host_vars(inventory, host, password_file, *(f'{prefix}_{name}' for name in urls), *tokens)
        assert re.fullmatch(database_url.replace('ROLE', role), seen[f'{prefix}_database_url'])
        # and logs in to Redis as its own user
        assert re.fullmatch(redis_url.replace('ROLE', role), seen[f'{prefix}_redis_url'])
        assert (seen[f'{prefix}_database_ca_file'], seen[f'{prefix}_redis_ca_file']) == (ca_file, ca_file)
    assert re.fullmatch(rf'{inventory}-monitor-[0-9a-f]{{24}}', seen['arq_monitor_token'])
    assert re.fullmatch(rf'{inventory}-monitor-read-[0-9a-f]{{24}}', seen['arq_monitor_read_token'])


def test_the_vault_files_are_encrypted() -> None:
    vaults = list(ROOT.glob('inventories/*/group_vars/*/vault.yml'))
    assert len(vaults) == 4  # all/ and arq_monitors/ of production and staging
    for vault in vaults:
        assert vault.read_text().startswith('$ANSIBLE_VAULT;1.1;AES256')


def test_the_lab_with_sentinels_replicates_redis_and_points_every_client_at_the_sentinels(
    password_file: Path,
) -> None:
    sentinels = "['lab-db:26379', 'lab-redis-2:26379', 'lab-redis-3:26379']"
    nodes = "['lab-db:6379', 'lab-redis-2:6379', 'lab-redis-3:6379']"
    names = ('redis_sentinels', 'redis_url', 'redis_username', 'redis_password', 'redis_sentinel_password')
    for host, prefix, user in (
        ('lab-worker-1', 'arq_worker', 'worker'),
        ('lab-db', 'arq_monitor', 'monitor'),
    ):
        seen = host_vars('lab+lab-ha', host, password_file, *(f'{prefix}_{name}' for name in names))
        assert seen == {
            f'{prefix}_redis_sentinels': sentinels,
            f'{prefix}_redis_url': '',
            f'{prefix}_redis_username': user,
            f'{prefix}_redis_password': f'lab-redis-{user}-password',
            f'{prefix}_redis_sentinel_password': 'lab-redis-sentinel-password',
        }
    seen = host_vars(
        'lab+lab-ha',
        'lab-redis-2',
        password_file,
        'redis_server_replication_nodes',
        'redis_server_sentinels',
        'redis_sentinel_hosts',
        'redis_sentinel_auth_password',
        'redis_server_min_replicas_to_write',
        'redis_server_restart_sec',
    )
    assert seen == {
        'redis_server_replication_nodes': nodes,
        'redis_server_sentinels': sentinels,
        'redis_sentinel_hosts': sentinels,
        'redis_sentinel_auth_password': 'lab-redis-sentinel-user-password',
        'redis_server_min_replicas_to_write': '1',
        # a crashed node comes back after the failover: twice the sentinels' 5 s down-after time
        'redis_server_restart_sec': '10.0',
    }
    # with TLS (LAB_TLS=true): TLS only on the nodes, the sentinels and every client's links to them
    seen = host_vars(
        'lab+lab-ha',
        'lab-redis-2',
        password_file,
        'redis_server_replication_nodes',
        'redis_sentinel_tls',
        'redis_sentinel_tls_cert_file',
        'redis_sentinel_tls_ca_cert_file',
        'arq_monitor_redis_sentinel_tls',
        extra='lab_fleet_tls=true',
    )
    assert seen == {
        'redis_server_replication_nodes': "['lab-db:6380', 'lab-redis-2:6380', 'lab-redis-3:6380']",
        'redis_sentinel_tls': 'True',
        'redis_sentinel_tls_cert_file': '/etc/ssl/flowworker/server.crt',
        'redis_sentinel_tls_ca_cert_file': '/etc/ssl/flowworker/ca.crt',
        # not a monitor host: what the group_vars would give one
        'arq_monitor_redis_sentinel_tls': 'True',
    }
    tls = ('redis_sentinel_tls', 'redis_ca_file', 'redis_sentinels')
    seen = host_vars(
        'lab+lab-ha',
        'lab-worker-1',
        password_file,
        *(f'arq_worker_{n}' for n in tls),
        extra='lab_fleet_tls=true',
    )
    assert seen == {
        'arq_worker_redis_sentinel_tls': 'True',
        'arq_worker_redis_ca_file': '/etc/ssl/flowworker/ca.crt',
        'arq_worker_redis_sentinels': sentinels,
    }
    # without the sentinels: one Redis, by its URL
    seen = host_vars(
        'lab', 'lab-worker-1', password_file, 'arq_worker_redis_url', 'arq_worker_redis_sentinels'
    )
    assert seen == {
        'arq_worker_redis_url': 'redis://worker:lab-redis-worker-password@lab-db:6379/0',
        'arq_worker_redis_sentinels': '[]',
    }
    seen = host_vars(
        'lab', 'lab-worker-1', password_file, 'arq_worker_redis_sentinel_tls', extra='lab_fleet_tls=true'
    )
    assert seen == {'arq_worker_redis_sentinel_tls': 'False'}
