"""flowworker.fleet.redis_master: who is master, recorded where Redis and Sentinel start from.

The answers are parsed by pure functions (a table below); the module itself runs through
ansible-playbook (connection local) against a real master, replica and sentinel on this machine
(worker/tests/servers.py's SentinelGroup, flowworker's ACL users), through a failover.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import ROOT
from .playbook import run_tasks

sys.path.insert(0, str(ROOT / 'collections'))
sys.path.insert(0, str(ROOT / 'worker' / 'tests'))

from ansible_collections.flowworker.fleet.plugins.modules.redis_master import (
    HEADER,
    master_of,
    monitors,
    role_answer,
    sentinel_answer,
    state_content,
)
from servers import SentinelGroup, free_port, wait_until


@pytest.mark.parametrize(
    ('answers', 'master'),
    [
        ([], None),
        ([None, None], None),
        (['a:1', None, 'a:1'], 'a:1'),
        (['b:1', 'a:1', 'a:1'], 'a:1'),  # most sentinels win over the first
        (['b:1', 'a:1'], 'b:1'),  # among equals, the first asked
    ],
)
def test_the_master_is_the_one_most_sentinels_name(answers: list[str | None], master: str | None) -> None:
    assert master_of(answers) == master


def test_the_answers_are_read_as_redis_cli_prints_them() -> None:
    assert sentinel_answer(['redis-2', '6379']) == 'redis-2:6379'
    assert sentinel_answer(['::1', '6379']) == '[::1]:6379'
    assert sentinel_answer(['']) is None  # no such master: a nil
    assert sentinel_answer(None) is None
    assert role_answer(['master', '120', 'redis-2', '6379', '120'], 'redis-1:6379') == 'redis-1:6379'
    assert role_answer(['slave', 'redis-1', '6379', 'connected', '120'], 'redis-2:6379') == 'redis-1:6379'
    assert role_answer(['sentinel', 'flowworker'], 'redis-1:26379') is None
    assert role_answer(None, 'redis-1:6379') is None


def test_the_state_files() -> None:
    assert state_content('server', 'redis-1:6379', 'redis-1:6379', 'fw', 2) == HEADER
    assert (
        state_content('server', 'redis-1:6379', 'redis-2:6379', 'fw', 2)
        == HEADER + 'replicaof redis-1 6379\n'
    )
    sentinel = state_content('sentinel', '[::1]:6379', 'x:26379', 'fw', 2)
    assert sentinel == HEADER + 'sentinel monitor fw ::1 6379 2\n'
    assert monitors(sentinel, 'fw')
    assert not monitors('sentinel monitor mymaster 127.0.0.1 6379 2\n', 'fw')


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    servers = tmp_path / 'servers'
    servers.mkdir()
    found = SentinelGroup(servers)
    found.start()
    yield found
    found.stop()


def task(group: SentinelGroup, check_mode: bool = False, **params: Any) -> dict[str, Any]:
    nodes = [f'127.0.0.1:{node.port}' for node in group.nodes]
    wanted = {
        'kind': 'server',
        'nodes': nodes,
        'address': nodes[1],
        'sentinels': [group.address],
        'master_name': group.NAME,
        'sentinel_password': group.PASSWORD,
        'node_user': 'admin',
        'node_password': 'admin-password',
    }
    return {'flowworker.fleet.redis_master': {**wanted, **params}, 'check_mode': check_mode}


def test_it_follows_the_sentinels_and_records_the_master_only_when_asked(
    group: SentinelGroup, tmp_path: Path
) -> None:
    first, second = (f'127.0.0.1:{node.port}' for node in group.nodes)
    state = tmp_path / 'redis-state.conf'
    debian = tmp_path / 'sentinel.conf'
    debian.write_text('sentinel monitor mymaster 127.0.0.1 6379 2\n')
    nowhere = f'127.0.0.1:{free_port()}'
    results, output = run_tasks(
        tmp_path,
        [
            # a replica's first start: its file names the master
            task(group, state_file=str(state)),
            task(group, state_file=str(state)),
            # a sentinel's file that monitors another name (Debian's) is replaced
            task(group, kind='sentinel', state_file=str(debian), address=group.address, quorum=1),
            # without sentinels, a node asks itself; nothing answers: the first node
            task(group, state_file=str(tmp_path / 'b.conf'), sentinels=[nowhere]),
            task(group, state_file=str(tmp_path / 'c.conf'), sentinels=[nowhere], address=nowhere),
        ],
        ('--diff',),
    )
    assert [r.get('failed', False) for r in results] == [False] * 5, output
    assert [(r['master'], r['source'], r['changed']) for r in results] == [
        (first, 'sentinels', True),
        (first, 'sentinels', False),
        (first, 'sentinels', True),
        (first, 'nodes', True),
        (first, 'inventory', True),
    ]
    assert state.read_text() == f'{HEADER}replicaof 127.0.0.1 {group.nodes[0].port}\n'
    assert state.stat().st_mode & 0o777 == 0o640
    assert debian.read_text() == f'{HEADER}sentinel monitor {group.NAME} 127.0.0.1 {group.nodes[0].port} 1\n'
    assert 'replicaof 127.0.0.1' in output  # the diff names the master; no password shows
    assert group.PASSWORD not in output
    assert 'admin-password' not in output

    # a failover: the file is left as it was until the role restarts the node (rewrite)
    with group.client() as sentinel:
        sentinel.execute_command('SENTINEL', 'FAILOVER', group.NAME)
    wait_until(lambda: group.master() is group.nodes[1], 30, 'the failover')
    results, output = run_tasks(
        tmp_path,
        [
            task(group, state_file=str(state), rewrite=True, check_mode=True),
            task(group, state_file=str(state)),
            task(group, state_file=str(state), rewrite=True),
            task(group, state_file=str(state), rewrite=True),
            # a changed quorum is set on the running sentinel, once
            task(group, kind='sentinel', state_file=str(debian), address=group.address, quorum=2),
            task(group, kind='sentinel', state_file=str(debian), address=group.address, quorum=2),
        ],
    )
    assert [(r['master'], r['changed']) for r in results] == [
        (second, True),
        (second, False),
        (second, True),
        (second, False),
        (second, True),
        (second, False),
    ], output
    assert state.read_text() == HEADER
    with group.client() as sentinel:
        assert int(sentinel.sentinel_master(group.NAME)['quorum']) == 2
