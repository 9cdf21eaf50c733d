"""Check the rules that span the arq_worker variables and derive the pools, on the controller.

Types and choices are checked by meta/argument_specs.yml before this runs. This checks what
spans variables, in one task, and fails with the first rule broken, naming the variable (for a
pool, ``arq_worker_pools[i].<key>``, and the role variable it came from) and the accepted values.
It returns the pools with their defaults filled in, their prefix, count, unit or program names,
max_jobs and metrics port, and every instance's Prometheus scrape target; ``tasks/validate.yml``
publishes them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

from ansible.plugins.action import ActionBase
from ansible_collections.flowworker.fleet.plugins.filter.urls import redis_addresses_problem
from ansible_collections.flowworker.fleet.plugins.plugin_utils.flowworker import urls

_spec = importlib.util.spec_from_file_location(
    'arq_worker_role_plan', Path(__file__).resolve().parent.parent / 'module_utils' / 'arq_worker_plan.py'
)
assert _spec is not None
assert _spec.loader is not None
_plan = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_plan)

POOL_NAME = re.compile(r'^[a-z0-9_]{1,32}$')
QUEUE = re.compile(r'^[A-Za-z0-9_.:-]+$')
ENV_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
LOG_LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR')
# flowworker's durations (`db prune --older-than`); 0 keeps every record
# a duration with its unit (a bare 30 would be seconds), or 0
RETENTION = re.compile(r'^([0-9]+(?:\.[0-9]+)?)([smhd])$|^0$')
RETENTION_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}
CALENDAR = re.compile(r'^[A-Za-z0-9*:,./~ -]+$')
# a pool's metrics ports lie this far apart by default: room for its 99 instances
METRICS_PORT_STRIDE = 100
MAX_PORT = 65535
# an IP address or a host name: it lands on the worker's command line and in the scrape targets
ADDRESS = re.compile(r'^[A-Za-z0-9_.:-]+$')


class Invalid(Exception):
    pass


def _int(value: Any) -> int:
    """Jinja's ``int``: a number, or 0."""
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return 0


def _float(value: Any) -> float:
    """Jinja's ``float``: a number, or 0.0."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def pools(
    raw_pools: list[dict[str, Any]], defaults: dict[str, Any], manager: str, vcpus: int, metrics_port: int
) -> list[dict]:
    out = []
    for index, raw in enumerate(raw_pools):
        pool = {**defaults, **raw}
        per_core = _int(pool['max_jobs_per_core'])
        if per_core > 0 and vcpus < 1:
            raise Invalid(
                f'arq_worker_pools[{index}] sizes max_jobs by the cores (max_jobs_per_core {per_core}), '
                "but the host's processor_vcpus fact is missing: gather the hardware facts"
            )
        prefix = _plan.prefix_of(str(pool['name']))
        count = _int(pool['instances'])
        out.append(
            {
                **pool,
                'prefix': prefix,
                'count': count,
                'names': [i.name for i in _plan.Pool(prefix, count, 0).instances(manager)],
                'index': index,
                'max_jobs': per_core * vcpus if per_core > 0 else pool['max_jobs'],
                'metrics_port': _int(pool['metrics_port'])
                if 'metrics_port' in raw
                else (metrics_port + METRICS_PORT_STRIDE * index if metrics_port > 0 else 0),
            }
        )
    return out


def scrape_targets(derived: list[dict], args: dict[str, Any]) -> list[dict[str, Any]]:
    """Prometheus file-SD entries, one per instance that serves metrics (tasks/metrics.yml)."""
    address = str(args['metrics_scrape_address'])
    if ':' in address:
        address = f'[{address}]'
    return [
        {
            'targets': [f'{address}:{pool["metrics_port"] + instance.number}'],
            # none of the labels the processes' own series carry (queue, flow, status, worker_id):
            # Prometheus would rename those to exported_*
            'labels': {'host': args['inventory_hostname'], 'pool': pool['name'], 'unit': instance.target},
        }
        for pool in derived
        if pool['metrics_port'] > 0
        for instance in _plan.Pool(pool['prefix'], pool['count'], 0).instances(args['process_manager'])
    ]


def scrape_files(targets: list[dict[str, Any]], args: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """This host's file-SD file and its directory, as flowworker.fleet.files entries, for each
    Prometheus host (tasks/metrics.yml writes those of all the play's hosts in one run per
    Prometheus host)."""
    directory = str(args['metrics_sd_dir'])
    content = json.dumps(targets, indent=4, sort_keys=True, separators=(',', ': ')) + '\n'
    files = [
        {'path': directory, 'state': 'directory', 'mode': '0755'},
        {'path': f'{directory}/{args["inventory_hostname"]}.json', 'content': content, 'mode': '0644'},
    ]
    return dict.fromkeys(args['metrics_sd_hosts'], files)


def unit_files(derived: list[dict], unit_dir: str) -> list[dict[str, Any]]:
    """Every pool's template unit and target, as flowworker.fleet.files entries (tasks/configure.yml)."""
    files = []
    for pool in derived:
        prefix = pool['prefix']
        for name, template, extra in (
            (
                f'{prefix}@.service',
                'arq-worker@.service.j2',
                {'__arq_worker_instance_name': f'{prefix}@%i', '__arq_worker_instance_number': '%i'},
            ),
            (f'{prefix}.target', 'arq-worker.target.j2', {}),
        ):
            files.append(
                {
                    'path': f'{unit_dir}/{name}',
                    'template': f'etc/systemd/system/{template}',
                    'vars': {'__arq_worker_pool': pool, **extra},
                    'owner': 'root',
                    'group': 'root',
                    'mode': '0644',
                    'unit': True,
                }
            )
    return files


def _instances_ok(value: Any) -> bool:
    whole = isinstance(value, int) or re.match(r'^[0-9]+$', str(value)) is not None
    return whole and 0 <= _int(value) <= 99


# Per pool, in this order: the key named, whether the pool passes, what the message says after
# "arq_worker_pools[i].<key> (from arq_worker_<key>) ".
POOL_RULES: list[tuple[str, Any, Any]] = [
    (
        'name',
        lambda p: POOL_NAME.match(str(p['name'])),
        lambda p: f"must match [a-z0-9_]{{1,32}} (it names units and programs); got '{p['name']}'.",
    ),
    (
        'queue',
        lambda p: QUEUE.match(str(p['queue'])),
        lambda p: f"must match [A-Za-z0-9_.:-]+; got '{p['queue']}'.",
    ),
    (
        'instances',
        lambda p: _instances_ok(p['instances']),
        lambda p: f"must be an integer from 0 to 99; got '{p['instances']}'.",
    ),
    (
        'max_jobs',
        lambda p: _int(p['max_jobs']) >= 1 and _int(p['max_jobs_per_core']) >= 0,
        lambda p: (
            'must be >= 1 and max_jobs_per_core >= 0; '
            f'got max_jobs {p["max_jobs"]}, max_jobs_per_core {p["max_jobs_per_core"]}.'
        ),
    ),
    (
        'job_timeout',
        lambda p: _float(p['job_timeout']) > 0,
        lambda p: f'must be > 0 seconds; got {p["job_timeout"]}.',
    ),
    (
        'drain_timeout',
        lambda p: 0 <= _float(p['drain_timeout']) <= _float(p['job_timeout']),
        lambda p: (
            f'must be from 0 to the job timeout ({p["job_timeout"]} s): a longer drain only delays '
            f'every stop; got {p["drain_timeout"]}.'
        ),
    ),
    (
        'stop_timeout',
        lambda p: _float(p['stop_timeout']) >= _float(p['drain_timeout']) + 10,
        lambda p: (
            '(systemd TimeoutStopSec, supervisor stopwaitsecs) must be >= drain_timeout + 10 = '
            f'{_float(p["drain_timeout"]) + 10} s, or the process is killed while it drains; '
            f'got {p["stop_timeout"]}.'
        ),
    ),
    (
        'heartbeat_interval',
        lambda p: _float(p['heartbeat_interval']) > 0,
        lambda p: f'must be > 0 seconds; got {p["heartbeat_interval"]}.',
    ),
    (
        'log_level',
        lambda p: str(p['log_level']).upper() in LOG_LEVELS,
        lambda p: f"must be one of DEBUG, INFO, WARNING, ERROR; got '{p['log_level']}'.",
    ),
    (
        'metrics_port',
        lambda p: p['metrics_port'] == 0 or 1 <= p['metrics_port'] <= MAX_PORT - max(p['count'], 1),
        lambda p: (
            f'must be 0 (no metrics) or a port from 1 to {MAX_PORT - max(p["count"], 1)}, leaving room '
            f'for the ports + 1 to + {p["count"]} of its instances; got {p["metrics_port"]}.'
        ),
    ),
]
# the role variable a key of the pool `default` comes from
ORIGIN = {
    'queue': 'arq_worker_queue_name',
    'name': None,
    'metrics_port': 'arq_worker_metrics_port + 100 * index',
}


def check_pools(args: dict[str, Any], derived: list[dict[str, Any]]) -> None:
    names = [pool.get('name') for pool in args['pools']]
    if not names or len(set(names)) != len(names):
        raise Invalid(
            f'arq_worker_pools must be a non-empty list of pools with unique names; names given: {names}.'
        )
    if args['process_manager'] == 'supervisor' and 'rpc' in names:
        raise Invalid(
            "arq_worker_pools: a pool named 'rpc' cannot run under supervisor: its group file would be "
            f'{_plan.SUPERVISOR_RPC_FILE}, the RPC extension of the role; name it otherwise.'
        )
    if not 0 <= _int(args['metrics_port']) <= MAX_PORT:
        raise Invalid(
            f'arq_worker_metrics_port must be 0 (no metrics) or a port up to {MAX_PORT}; '
            f'got {args["metrics_port"]}.'
        )
    for key, passes, message in POOL_RULES:
        for pool in derived:
            if not passes(pool):
                origin = ORIGIN.get(key, f'arq_worker_{key}')
                came = f' (from {origin})' if origin and pool['name'] == 'default' else ''
                raise Invalid(f'arq_worker_pools[{pool["index"]}].{key}{came} {message(pool)}')
    check_metrics_ports(args, derived)


def check_metrics_ports(args: dict[str, Any], derived: list[dict[str, Any]]) -> None:
    """No two instances of the host share a metrics port; the targets go to hosts of the inventory."""
    taken: dict[int, str] = {}
    for pool in derived:
        if pool['metrics_port'] == 0:
            continue
        for port in range(pool['metrics_port'] + 1, pool['metrics_port'] + pool['count'] + 1):
            if port in taken:
                raise Invalid(
                    f'arq_worker_pools[{pool["index"]}].metrics_port ({pool["metrics_port"]}) gives its '
                    f'instances ports that pool {taken[port]!r} uses too (port {port}): give each pool a '
                    f'range of its own (instance N listens on metrics_port + N).'
                )
            taken[port] = pool['name']
    for name, what in (
        ('metrics_address', 'to bind the metrics ports to'),
        ('metrics_scrape_address', 'Prometheus reaches this host at'),
    ):
        if taken and not ADDRESS.match(str(args[name])):
            raise Invalid(
                f'arq_worker_{name} must be an IP address or a host name {what}, such as 127.0.0.1 '
                f'(letters, digits, . : - _); got {str(args[name])!r}.'
            )
    if unknown := [host for host in args['metrics_sd_hosts'] if host not in args['inventory_hosts']]:
        raise Invalid(
            f'arq_worker_metrics_sd_hosts names {unknown}, which are no hosts of the inventory: name '
            "the hosts where Prometheus runs (each gets a file-SD file of this host's instances)."
        )
    if args['metrics_sd_hosts'] and not str(args['metrics_sd_dir']).startswith('/'):
        raise Invalid(f'arq_worker_metrics_sd_dir must be an absolute path (got {args["metrics_sd_dir"]!r}).')


def redis_problems(role: str, args: dict[str, Any]) -> dict[str, str | None]:
    """Redis by its URL, or by its sentinels (then no URL, and the name of their master)."""
    if not args.get('redis_sentinels'):
        return {
            f'{role}_redis_url': urls.redis_url_problem(args['redis_url']),
            f'{role}_redis_sentinel_tls': 'needs sentinels (a Redis URL asks for TLS with rediss://)'
            if args.get('redis_sentinel_tls')
            else None,
        }
    url = f'{role}_redis_url (with {role}_redis_sentinels)'
    return {
        f'{role}_redis_sentinels': redis_addresses_problem(args['redis_sentinels']) or None,
        url: 'must be "": the sentinels name the Redis to connect to' if args['redis_url'] else None,
        f'{role}_redis_sentinel_master': None
        if args.get('redis_sentinel_master')
        else 'must name the master',
    }


def check(args: dict[str, Any], derived: list[dict[str, Any]]) -> None:
    manager = args['process_manager']
    if manager != 'supervisor' and args['service_mgr'] != 'systemd':
        raise Invalid(
            f"arq_worker_process_manager is '{manager}' but this host's service manager is "
            f"'{args['service_mgr']}': use 'supervisor' or a systemd host."
        )
    problems = {
        'arq_worker_database_url': urls.database_url_problem(args['database_url']),
        **redis_problems('arq_worker', args),
        # the schema owner migrates the schema
        'arq_worker_db_owner_url (arq_worker_db_upgrade is true)': args['db_upgrade']
        and urls.database_url_problem(args['db_owner_url']),
    }
    if told := [f'{name} {problem}' for name, problem in problems.items() if problem]:
        # what is wrong, never the values: a URL may hold a password
        raise Invalid('; '.join(told) + '.')
    for name, env in (('database_ca_file', 'DATABASE_SSLROOTCERT'), ('redis_ca_file', 'REDIS_TLS_CA_CERTS')):
        if args[name] and not str(args[name]).startswith('/'):
            raise Invalid(
                f'arq_worker_{name} must be "" (the system\'s CAs) or an absolute path on the host '
                f'(got {args[name]!r}).'
            )
        if env in args['extra_env']:
            raise Invalid(
                f'arq_worker_extra_env sets {env}, which the role writes from arq_worker_{name}: set that.'
            )
    constraints = str(args.get('constraints') or '')
    if constraints and not Path(constraints).is_file():
        raise Invalid(
            f'arq_worker_constraints is {constraints!r}, which is no file on the controller: '
            'point it at the lock file (make lock writes worker/requirements.lock), or set it to "" '
            'to resolve the dependencies afresh on every install.'
        )
    check_pools(args, derived)
    check_retention(args)
    check_owner_hosts(args)
    paths = (args['home'], args['config_dir'], args['log_dir'])
    if not (
        _int(args['nofile_limit']) >= 1024
        and _int(args['nproc_limit']) >= 64
        and _int(args['keep_versions']) >= 0
        and (args['install_method'] != 'pypi' or args['version'])
        and all(ENV_NAME.match(str(key)) for key in args['extra_env'])
        and all(re.match(r'^/.+', str(path)) for path in paths)
    ):
        raise Invalid(
            f'arq_worker_nofile_limit must be >= 1024 (got {args["nofile_limit"]}); '
            f'arq_worker_nproc_limit must be >= 64 (got {args["nproc_limit"]}); '
            f'arq_worker_keep_versions must be >= 0 (got {args["keep_versions"]}); '
            "arq_worker_version must be set when arq_worker_install_method is 'pypi'; "
            f'arq_worker_extra_env keys must be shell-style names (got {list(args["extra_env"])}); '
            'arq_worker_home, arq_worker_config_dir and arq_worker_log_dir must be absolute paths.'
        )


def retention_seconds(value: Any) -> float:
    """arq_worker_record_retention in seconds (0: keep every record); Invalid if it is no duration."""
    match = RETENTION.match(str(value).strip())
    if not match:
        raise Invalid(
            'arq_worker_record_retention must be a duration with its unit (s, m, h, d) such as 12h or 30d, '
            'or 0 to keep every record '
            f'(got {str(value).strip()!r}).'
        )
    return float(match[1]) * RETENTION_UNITS[match[2]] if match[1] else 0.0


def prunes(args: dict[str, Any]) -> bool:
    """This host runs the prune timer: it is arq_worker_record_prune_host and records are not kept forever."""
    return (
        args['inventory_hostname'] == args['record_prune_host']
        and retention_seconds(args['record_retention']) > 0
    )


def check_retention(args: dict[str, Any]) -> None:
    retention = str(args['record_retention']).strip()
    retention_seconds(retention)
    if not CALENDAR.match(str(args['record_prune_schedule'])):
        raise Invalid(
            'arq_worker_record_prune_schedule must be a systemd OnCalendar expression such as daily or '
            f'"*-*-* 03:00:00" (got {args["record_prune_schedule"]!r}).'
        )
    if not prunes(args):
        return
    owner_url = urls.database_url_problem(args['db_owner_url'])
    if args['service_mgr'] != 'systemd' or owner_url:
        raise Invalid(
            f'arq_worker_record_retention is {retention}: this host (arq_worker_record_prune_host) prunes '
            'the records on a systemd timer as the schema owner, so it needs systemd (it has '
            f"'{args['service_mgr']}') and arq_worker_db_owner_url as a PostgreSQL URL"
            f'{" (it " + owner_url + ")" if owner_url else ""}; or set arq_worker_record_retention: 0 '
            'to keep every record.'
        )


def check_owner_hosts(args: dict[str, Any]) -> None:
    """The hosts that work as the schema owner are hosts of the inventory (or nothing migrates or prunes)."""
    prunes_at_all = retention_seconds(args['record_retention']) > 0
    needed = {
        'arq_worker_db_upgrade_host': args['db_upgrade'] and args['db_upgrade_host'],
        'arq_worker_record_prune_host': prunes_at_all and args['record_prune_host'],
    }
    for name, host in needed.items():
        if host and host not in args['inventory_hosts']:
            raise Invalid(
                f'{name} is {host!r}, which is no host of the inventory: name the worker host that works as '
                'the schema owner (PostgreSQL lets the owner in from there alone).'
            )


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: str | None = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        args = self._task.args
        try:
            vcpus = _int(args['vcpus'])
            derived = pools(
                args['pools'],
                args['pool_defaults'],
                args['process_manager'],
                vcpus,
                _int(args['metrics_port']),
            )
            check(args, derived)
        except Invalid as exc:
            return {**result, 'failed': True, 'msg': str(exc)}
        return {
            **result,
            'changed': False,
            'pools': derived,
            'prunes': prunes(args),
            'scrape_files': scrape_files(scrape_targets(derived, args), args),
            'unit_files': (
                unit_files(derived, args['unit_dir']) if args['process_manager'] == 'systemd' else []
            ),
        }
