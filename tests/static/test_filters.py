"""flowworker.fleet's filters: the URL checks (arq_monitor's validation) and the services' sandbox."""

from __future__ import annotations

import io
import sys

from dotenv import dotenv_values

from ..conftest import ROOT

sys.path.insert(0, str(ROOT / 'collections'))

from ansible_collections.flowworker.fleet.plugins.filter import systemd, urls

FILTERS = {**urls.FilterModule().filters(), **systemd.FilterModule().filters()}


def test_a_good_url_has_no_problem() -> None:
    assert FILTERS['database_url_problem']('postgresql://u:pw@db/flows', 'arq_monitor_database_url') == ''
    assert FILTERS['redis_url_problem']('rediss://:pw@cache:6380/0', 'arq_monitor_redis_url') == ''


def test_a_problem_names_the_variable_and_never_the_url() -> None:
    told = FILTERS['redis_url_problem']('http://:hunter2@cache', 'arq_monitor_redis_url')
    assert told == (
        'arq_monitor_redis_url must be a redis://[[user]:password@]host:port/db URL '
        "(rediss:// for TLS, or unix:///path) (got scheme 'http')"
    )
    assert FILTERS['database_url_problem'](None) == (
        'must be a postgresql://user:password@host:port/name URL (got an empty one)'
    )


def test_addresses_are_checked_as_redis_sentinels_takes_them() -> None:
    check = FILTERS['redis_addresses_problem']
    assert check(['redis-1:6379', '[::1]:6379'], 'redis_server_replication_nodes') == ''
    assert check([]) == ''
    assert check(['redis-1:6379', 'redis://:pw@redis-2:6379'], 'nodes') == (
        'nodes must be comma-separated host:port entries, e.g. sentinel-1:26379,sentinel-2:26379 '
        '([::1]:26379 for IPv6) (got entry 2, a URL or a path)'
    )
    assert 'got entry 1, one with no :port' in check(['redis-1'])
    assert 'one address each' in check(['a:1,b:1'])
    assert 'one address each' in check(['a:1', ''])


def test_the_addresses_of_inventory_hosts_are_their_stack_address_else_their_name() -> None:
    hostvars = {
        'redis-1': {'stack_address': '10.0.0.5'},
        'redis-2': {},
        'redis-3': {'stack_address': 'fd00::3'},
    }
    found = FILTERS['addresses'](['redis-1', 'redis-2', 'redis-3'], hostvars, 26379)
    assert found == ['10.0.0.5:26379', 'redis-2:26379', '[fd00::3]:26379']
    assert FILTERS['redis_addresses_problem'](found) == ''


def test_env_values_are_read_back_as_they_were() -> None:
    for value in ['plain', 'a #b c', 'q\'uo"te\\back', ' spaces ']:
        line = f'P={FILTERS["env_quote"](value)}\n'
        assert dotenv_values(stream=io.StringIO(line))['P'] == value, line


def test_the_sandbox_writes_only_the_paths_given_and_keeps_a_low_port_s_one_capability() -> None:
    worker = FILTERS['systemd_sandbox'](['/var/log/arq-worker']).splitlines()
    assert worker[-1] == 'ReadWritePaths=/var/log/arq-worker'
    assert {'CapabilityBoundingSet=', 'PrivateUsers=yes', 'ProtectSystem=strict'} <= set(worker)
    monitor = FILTERS['systemd_sandbox']([], bind_service=True).splitlines()
    assert 'CapabilityBoundingSet=CAP_NET_BIND_SERVICE' in monitor
    assert 'PrivateUsers=yes' not in monitor
    assert not any(line.startswith('ReadWritePaths=') for line in monitor)


def test_url_quote_encodes_what_a_user_or_password_cannot_hold() -> None:
    # `/` too, which urlencode leaves (a base64 vault secret has it); the worker decodes it back
    assert FILTERS['url_quote']('p@ss/w:rd% +') == 'p%40ss%2Fw%3Ard%25%20%2B'
