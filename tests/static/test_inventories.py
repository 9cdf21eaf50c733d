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


def host_vars(inventory: str, host: str, password_file: Path, *names: str) -> dict[str, str]:
    """Variables as a play on ``host`` sees them (playbooks/group_vars included), without contacting it."""
    expression = '{' + ','.join(f"'{name}':{name}" for name in names) + '}'  # one word for -a
    result = subprocess.run(
        [
            'ansible',
            '-i',
            f'inventories/{inventory}',
            '--playbook-dir',
            'playbooks',
            host,
            '-m',
            'ansible.builtin.debug',
            '-a',
            f'var={expression}',
            '--vault-password-file',
            str(password_file),
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
