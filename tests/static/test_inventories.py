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


def host_var(inventory: str, host: str, variable: str, password_file: Path) -> str:
    """A variable as a play on ``host`` sees it (playbooks/group_vars included), without contacting it."""
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
            f'var={variable}',
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
    return str(report['plays'][0]['tasks'][0]['hosts'][host][variable])


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / 'vault-password'
    path.write_text(EXAMPLE_VAULT_PASSWORD + '\n')
    return path


@pytest.mark.parametrize(
    ('inventory', 'hosts', 'database_url', 'redis_url'),
    [
        (
            'production',
            ('worker-1.prod.example.internal', 'ops-1.prod.example.internal'),
            r'postgresql://flow_ROLE:production-ROLE[\w-]+@pg-1.prod.example.internal:5432/flows\?sslmode=verify-full',
            r'rediss://:production-redis-\w+@redis-1.prod.example.internal:6380/0',
        ),
        (
            'staging',
            ('worker-2.staging.example.internal', 'data-1.staging.example.internal'),
            r'postgresql://flow_ROLE:staging-ROLE[\w-]+@data-1.staging.example.internal:5432/flows',
            r'redis://:staging-redis-\w+@data-1.staging.example.internal:6379/0',
        ),
    ],
)
def test_the_dsns_and_the_monitor_token_come_from_the_inventory_and_its_vault(
    inventory: str, hosts: tuple[str, str], database_url: str, redis_url: str, password_file: Path
) -> None:
    worker, monitor = hosts
    # the monitor reads with PostgreSQL's read-only monitor role; its token is in its group's own vault file
    for host, prefix, role in ((worker, 'arq_worker', 'worker'), (monitor, 'arq_monitor', 'monitor')):
        dsn = host_var(inventory, host, f'{prefix}_database_url', password_file)
        assert re.fullmatch(database_url.replace('ROLE', role), dsn)
        assert re.fullmatch(redis_url, host_var(inventory, host, f'{prefix}_redis_url', password_file))
    token = host_var(inventory, monitor, 'arq_monitor_token', password_file)
    assert re.fullmatch(rf'{inventory}-monitor-[0-9a-f]{{24}}', token)
    read_token = host_var(inventory, monitor, 'arq_monitor_read_token', password_file)
    assert re.fullmatch(rf'{inventory}-monitor-read-[0-9a-f]{{24}}', read_token)


def test_the_vault_files_are_encrypted() -> None:
    vaults = list(ROOT.glob('inventories/*/group_vars/*/vault.yml'))
    assert len(vaults) == 4  # all/ and arq_monitors/ of production and staging
    for vault in vaults:
        assert vault.read_text().startswith('$ANSIBLE_VAULT;1.1;AES256')
