"""The arq_worker role's cross-variable checks (roles/arq_worker/action_plugins/arq_worker_validate.py),
called as the task calls them but without a host. The messages a user sees at the end of a run
are tested by the bad_inputs scenario; this covers the rules that scenario does not reach."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

# the plugin imports flowworker's URL check from the project's collection, as ansible-playbook finds it
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'collections'))
PLUGIN = (
    Path(__file__).resolve().parents[2] / 'roles' / 'arq_worker' / 'action_plugins' / 'arq_worker_validate.py'
)
_spec = importlib.util.spec_from_file_location('arq_worker_validate_under_test', PLUGIN)
assert _spec is not None
assert _spec.loader is not None
validate = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate)

DEFAULTS = {
    'queue': 'default',
    'instances': 3,
    'max_jobs': 10,
    'max_jobs_per_core': 0,
    'job_timeout': 3600,
    'drain_timeout': 300,
    'stop_timeout': 600,
    'heartbeat_interval': 5,
    'log_level': 'INFO',
}


def args(**changes: Any) -> dict[str, Any]:
    base = {
        'pools': [{'name': 'default'}],
        'pool_defaults': DEFAULTS,
        'process_manager': 'systemd',
        'service_mgr': 'systemd',
        'vcpus': 4,
        'database_url': 'postgresql://flow_worker:pw@db:5432/flows',
        'redis_url': 'redis://:pw@db:6379/0',
        'db_upgrade': False,
        'db_owner_url': '',
        'database_ca_file': '/etc/ssl/flowworker/ca.crt',
        'redis_ca_file': '',
        'nofile_limit': 65536,
        'nproc_limit': 4096,
        'keep_versions': 2,
        'install_method': 'wheelhouse',
        'version': '0.1.0',
        'extra_env': {},
        'home': '/opt/arq-worker',
        'config_dir': '/etc/arq-worker',
        'log_dir': '/var/log/arq-worker',
        'record_retention': '30d',
        'record_prune_schedule': 'daily',
        'record_prune_host': 'worker-1',
        'db_upgrade_host': 'worker-1',
        'inventory_hosts': ['worker-1', 'worker-2'],
        'inventory_hostname': 'worker-2',
        'metrics_port': 9300,
        'metrics_address': '127.0.0.1',
        'metrics_scrape_address': 'worker-2.example.internal',
        'metrics_sd_hosts': ['worker-1'],
        'metrics_sd_dir': '/etc/prometheus/file_sd/flowworker',
    }
    return {**base, **changes}


def derive(given: dict[str, Any]) -> list[dict[str, Any]]:
    return validate.pools(
        given['pools'],
        given['pool_defaults'],
        given['process_manager'],
        given['vcpus'],
        given['metrics_port'],
    )


def test_the_pools_are_derived_with_their_names_and_max_jobs() -> None:
    given = args(
        pools=[{'name': 'default'}, {'name': 'io', 'instances': 2, 'max_jobs_per_core': 5}],
        process_manager='supervisor',
    )
    pools = derive(given)
    validate.check(given, pools)
    assert [(p['prefix'], p['count'], p['names'], p['max_jobs']) for p in pools] == [
        ('arq-worker', 3, ['arq-worker_01', 'arq-worker_02', 'arq-worker_03'], 10),
        ('arq-worker-io', 2, ['arq-worker-io_01', 'arq-worker-io_02'], 20),
    ]


@pytest.mark.parametrize(
    ('manager', 'unit'),
    [('systemd', 'arq-worker-io@2.service'), ('supervisor', 'arq-worker-io:arq-worker-io_02')],
)
def test_each_pool_has_a_range_of_metrics_ports_and_each_instance_a_target(manager: str, unit: str) -> None:
    given = args(
        pools=[
            {'name': 'default', 'instances': 1},
            {'name': 'io', 'instances': 2, 'queue': 'io'},
            {'name': 'quiet', 'metrics_port': 0},
            {'name': 'own', 'instances': 1, 'metrics_port': 10000},
        ],
        process_manager=manager,
    )
    pools = derive(given)
    validate.check(given, pools)
    assert [p['metrics_port'] for p in pools] == [9300, 9400, 0, 10000]
    targets = validate.scrape_targets(pools, given)
    assert [t['targets'] for t in targets] == [
        ['worker-2.example.internal:9301'],
        ['worker-2.example.internal:9401'],
        ['worker-2.example.internal:9402'],
        ['worker-2.example.internal:10001'],
    ]
    assert targets[2]['labels'] == {'host': 'worker-2', 'pool': 'io', 'unit': unit}
    assert validate.scrape_targets(derive(args(metrics_port=0)), args(metrics_port=0)) == []
    ipv6 = args(metrics_scrape_address='fd00::7', pools=[{'name': 'default', 'instances': 1}])
    assert validate.scrape_targets(derive(ipv6), ipv6)[0]['targets'] == ['[fd00::7]:9301']


def test_the_file_sd_file_of_a_host_goes_to_each_prometheus_host() -> None:
    given = args(metrics_sd_hosts=['prom-1', 'prom-2'], inventory_hosts=['worker-2', 'prom-1', 'prom-2'])
    targets = validate.scrape_targets(derive(given), given)

    files = validate.scrape_files(targets, given)

    directory = {'path': '/etc/prometheus/file_sd/flowworker', 'state': 'directory', 'mode': '0755'}
    assert list(files) == ['prom-1', 'prom-2']
    assert files['prom-1'] == files['prom-2']
    [first, own] = files['prom-1']
    assert first == directory
    assert own['path'] == '/etc/prometheus/file_sd/flowworker/worker-2.json'
    # as Ansible's to_nice_json writes it, so a file written by an earlier release stays unchanged
    assert own['content'] == json.dumps(targets, indent=4, sort_keys=True, separators=(',', ': ')) + '\n'
    assert json.loads(own['content'])[0]['targets'] == ['worker-2.example.internal:9301']
    assert validate.scrape_files(targets, args(metrics_sd_hosts=[])) == {}


def test_pools_sized_by_the_cores_need_the_hardware_facts() -> None:
    given = args(pools=[{'name': 'default'}, {'name': 'io', 'max_jobs_per_core': 5}], vcpus=0)
    with pytest.raises(validate.Invalid, match=r'arq_worker_pools\[1\] sizes max_jobs by the cores'):
        derive(given)
    assert [p['max_jobs'] for p in derive({**given, 'pools': [{'name': 'default'}]})] == [10]


@pytest.mark.parametrize(
    ('changes', 'message'),
    [
        (
            {'service_mgr': 'sysvinit'},
            "arq_worker_process_manager is 'systemd' but this host's service manager",
        ),
        (
            {'db_upgrade': True},
            'arq_worker_db_owner_url (arq_worker_db_upgrade is true) must be a postgresql://',
        ),
        (
            {'redis_url': 'http://db'},
            'arq_worker_redis_url must be a redis://[[user]:password@]host:port/db URL (rediss:// for TLS, '
            "or unix:///path) (got scheme 'http')",
        ),
        (
            {'redis_sentinels': ['s1:26379'], 'redis_sentinel_master': 'flowworker'},
            'arq_worker_redis_url (with arq_worker_redis_sentinels) must be "": the sentinels name the Redis',
        ),
        (
            {'redis_url': '', 'redis_sentinels': ['s1:26379', 's2'], 'redis_sentinel_master': ''},
            'arq_worker_redis_sentinels must be comma-separated host:port entries, e.g. sentinel-1:26379,'
            'sentinel-2:26379 ([::1]:26379 for IPv6) (got entry 2, one with no :port); '
            'arq_worker_redis_sentinel_master must name the master.',
        ),
        (
            {'redis_sentinel_tls': True},
            'arq_worker_redis_sentinel_tls needs sentinels (a Redis URL asks for TLS with rediss://).',
        ),
        (
            {'extra_env': {'REDIS_TLS_CA_CERTS': '/etc/ssl/ca.crt'}},
            'arq_worker_extra_env sets REDIS_TLS_CA_CERTS, which the role writes from arq_worker_redis_ca_',
        ),
        (
            {'redis_ca_file': 'ca.crt'},
            'arq_worker_redis_ca_file must be "" (the system\'s CAs) or an absolute path',
        ),
        (
            {'pools': [{'name': 'rpc'}], 'process_manager': 'supervisor'},
            "a pool named 'rpc' cannot run under supervisor",
        ),
        ({'pools': [{'name': 'io', 'instances': '2x'}]}, 'arq_worker_pools[0].instances must be an integer'),
        (
            {'pools': [{'name': 'default', 'log_level': 'loud'}]},
            'arq_worker_pools[0].log_level (from arq_worker_log_level)',
        ),
        (
            {'pools': [{'name': 'default', 'queue': 'a b'}]},
            'arq_worker_pools[0].queue (from arq_worker_queue_name)',
        ),
        ({'keep_versions': -1}, 'arq_worker_keep_versions must be >= 0 (got -1)'),
        (
            {'install_method': 'pypi', 'version': ''},
            "arq_worker_version must be set when arq_worker_install_method is 'pypi'",
        ),
        ({'log_dir': 'logs'}, 'must be absolute paths'),
        ({'record_retention': '30 days'}, 'arq_worker_record_retention must be a duration with its unit'),
        ({'record_retention': '30'}, 'arq_worker_record_retention must be a duration with its unit'),
        (
            {'record_prune_schedule': 'daily; rm'},
            'arq_worker_record_prune_schedule must be a systemd OnCalendar',
        ),
        (
            {'inventory_hostname': 'worker-1'},
            'arq_worker_record_retention is 30d: this host (arq_worker_record_prune_host) prunes',
        ),
        (
            {
                'inventory_hostname': 'worker-1',
                'db_owner_url': 'postgresql://o:pw@db/flows',
                'service_mgr': 'openrc',
                'process_manager': 'supervisor',
            },
            "so it needs systemd (it has 'openrc')",
        ),
        (
            {'db_upgrade': True, 'db_owner_url': 'postgresql://o:pw@db/flows', 'db_upgrade_host': 'worker-9'},
            "arq_worker_db_upgrade_host is 'worker-9', which is no host of the inventory",
        ),
        ({'record_prune_host': 'wrker-1'}, "arq_worker_record_prune_host is 'wrker-1', which is no host"),
        ({'metrics_port': 70000}, 'arq_worker_metrics_port must be 0 (no metrics) or a port up to 65535'),
        (
            {'metrics_port': 65534},
            'arq_worker_pools[0].metrics_port (from arq_worker_metrics_port + 100 * index) must be 0 (no '
            'metrics) or a port from 1 to 65532',
        ),
        (
            {'pools': [{'name': 'default', 'instances': 3}, {'name': 'io', 'metrics_port': 9302}]},
            "arq_worker_pools[1].metrics_port (9302) gives its instances ports that pool 'default' uses "
            'too (port 9303)',
        ),
        (
            {'metrics_address': '127.0.0.1 --quiet'},
            'arq_worker_metrics_address must be an IP address or a host name',
        ),
        (
            {'metrics_scrape_address': ''},
            'arq_worker_metrics_scrape_address must be an IP address or a host name',
        ),
        (
            {'metrics_sd_hosts': ['prom-9']},
            "arq_worker_metrics_sd_hosts names ['prom-9'], which are no hosts",
        ),
        ({'metrics_sd_dir': 'file_sd'}, 'arq_worker_metrics_sd_dir must be an absolute path'),
    ],
)
def test_a_broken_rule_names_the_variable(changes: dict[str, Any], message: str) -> None:
    given = args(**changes)
    with pytest.raises(validate.Invalid) as failed:
        validate.check(given, derive(given))
    assert message in str(failed.value)


def test_redis_by_its_sentinels_needs_no_url() -> None:
    given = args(
        redis_url='', redis_sentinels=['s1:26379', '[::1]:26379'], redis_sentinel_master='flowworker'
    )
    validate.check(given, derive(given))


def test_a_pool_named_rpc_is_fine_under_systemd() -> None:
    given = args(pools=[{'name': 'rpc'}])
    validate.check(given, derive(given))


@pytest.mark.parametrize(
    ('retention', 'prunes'),
    [('0', False), (0, False), ('0d', False), ('0.0h', False), ('12h', True), ('1.5d', True)],
)
def test_a_retention_of_zero_in_any_unit_keeps_every_record(retention: object, prunes: bool) -> None:
    given = args(
        record_retention=retention, inventory_hostname='worker-1', db_owner_url='postgresql://o:pw@db/flows'
    )
    validate.check(given, derive(given))
    assert validate.prunes(given) is prunes
    assert validate.prunes({**given, 'inventory_hostname': 'worker-2'}) is False
