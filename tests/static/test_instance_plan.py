"""The arq_worker role's planner (roles/arq_worker/module_utils/arq_worker_plan.py): from what a host
runs, whatever manages it, to what its pools ask for. No host: the planner is pure."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'roles' / 'arq_worker' / 'module_utils'))

from arq_worker_plan import (
    Found,
    Host,
    Instance,
    Plan,
    Pool,
    parse_instance,
    parse_worker_id,
    plan,
    prefix_of,
    supervisor_file_of,
    systemd_pool_of,
)

HOST = 'web1'
UNITS = '/etc/systemd/system'
CONF = '/etc/supervisor/conf.d'


def unit(n: int, prefix: str = 'arq-worker') -> Instance:
    return Instance('systemd', prefix, n)


def program(n: int, prefix: str = 'arq-worker') -> Instance:
    return Instance('supervisor', prefix, n)


def runs(instance: Instance, started_at: float = 100.0, config_at: float = 50.0, **kw: object) -> Found:
    """A running instance with its files, started after its configuration changed."""
    return Found(
        instance,
        running=True,
        pid=1000 + instance.number,
        started_at=started_at,
        config_at=config_at,
        paths=paths_of(instance),
        **kw,  # type: ignore[arg-type]
    )


def paths_of(instance: Instance) -> tuple[str, ...]:
    if instance.manager == 'systemd':
        return (
            f'{UNITS}/multi-user.target.wants/{instance.name}',
            f'{UNITS}/{instance.prefix}.target.wants/{instance.name}',
        )
    return (f'{CONF}/{instance.name}.conf', f'/var/log/arq-worker/{instance.name}.log')


def pool_files(manager: str, prefix: str = 'arq-worker') -> dict[tuple[str, str], tuple[str, ...]]:
    if manager == 'systemd':
        files = (f'{UNITS}/{prefix}@.service', f'{UNITS}/{prefix}.target', f'{UNITS}/{prefix}.target.wants')
    else:
        files = (f'{CONF}/{prefix}.conf',)
    return {(manager, prefix): files}


def host(*found: Found, files: dict | None = None, keys: tuple[str, ...] | None = None, targets=None) -> Host:
    prefixes = {f.instance.prefix for f in found if f.instance.manager == 'systemd'}
    return Host(
        instances=found,
        pool_files=files
        if files is not None
        else {k: v for f in found for k, v in pool_files(f.instance.manager, f.instance.prefix).items()},
        targets_up=frozenset(targets if targets is not None else prefixes),
        keys=frozenset(
            keys if keys is not None else (f.instance.worker_id(HOST) for f in found if f.running)
        ),
    )


def pools(**counts: int) -> list[Pool]:
    return [Pool(prefix_of(name), count, 30.0) for name, count in counts.items()]


def names(instances: list[Instance]) -> list[str]:
    return [i.name for i in instances]


def test_a_host_that_runs_its_pools_needs_nothing() -> None:
    for manager, make in (('systemd', unit), ('supervisor', program)):
        now = host(*(runs(make(n)) for n in (1, 2, 3)))
        result = plan(manager, pools(default=3), now, HOST, default_drain_timeout=300)
        assert not result.changes, result
        assert result.steps() == []


def test_scale_up_starts_the_new_instances_together_and_touches_the_others() -> None:
    result = plan(
        'systemd', pools(default=4), host(runs(unit(1)), runs(unit(2))), HOST, default_drain_timeout=300
    )
    assert names(result.start) == ['arq-worker@3.service', 'arq-worker@4.service']
    assert result.stop == result.restart == result.remove == result.forget == []
    assert [(s.verb, names(list(s.instances))) for s in result.steps()] == [
        ('start', ['arq-worker@3.service', 'arq-worker@4.service'])
    ]


def test_scale_down_drains_the_surplus_one_at_a_time_and_removes_its_files_and_keys() -> None:
    now = host(*(runs(program(n)) for n in (1, 2, 3, 4, 5)))
    result = plan('supervisor', pools(default=3), now, HOST, default_drain_timeout=300)
    assert names(result.stop) == names(result.drain) == ['arq-worker_04', 'arq-worker_05']
    assert result.start == []
    assert result.remove == sorted(paths_of(program(4)) + paths_of(program(5)))
    assert result.forget == ['web1:arq-worker_04', 'web1:arq-worker_05']
    assert [s.verb for s in result.steps()] == ['drain', 'drain']
    assert result.drain_timeouts['arq-worker_04'] == 30.0


def test_to_zero_stops_every_instance_a_systemd_pool_keeps_its_unit_a_supervisor_group_goes() -> None:
    systemd = plan(
        'systemd', pools(default=0), host(runs(unit(1)), runs(unit(2))), HOST, default_drain_timeout=300
    )
    assert names(systemd.stop) == ['arq-worker@1.service', 'arq-worker@2.service']
    assert systemd.pools_gone == []
    assert f'{UNITS}/arq-worker@.service' not in systemd.remove

    supervisor = plan('supervisor', pools(default=0), host(runs(program(1))), HOST, default_drain_timeout=300)
    assert names(supervisor.stop) == ['arq-worker_01']
    assert supervisor.pools_gone == [('supervisor', 'arq-worker')]
    assert f'{CONF}/arq-worker.conf' in supervisor.remove


def test_several_pools_from_nothing_start_every_instance_and_every_target() -> None:
    result = plan('systemd', pools(default=2, background=1), Host(), HOST, default_drain_timeout=300)
    assert names(result.start) == [
        'arq-worker@1.service',
        'arq-worker@2.service',
        'arq-worker-background@1.service',
    ]
    assert result.targets == ['arq-worker', 'arq-worker-background']
    assert result.stop == result.remove == result.forget == []


def test_a_pool_removed_goes_with_its_instances_unit_target_and_keys() -> None:
    now = host(runs(unit(1)), runs(unit(1, 'arq-worker-background')), runs(unit(2, 'arq-worker-background')))
    result = plan('systemd', pools(default=1), now, HOST, default_drain_timeout=120)
    assert names(result.stop) == ['arq-worker-background@1.service', 'arq-worker-background@2.service']
    assert result.pools_gone == [('systemd', 'arq-worker-background')]
    assert set(pool_files('systemd', 'arq-worker-background')[('systemd', 'arq-worker-background')]) <= set(
        result.remove
    )
    assert not any(path.startswith(f'{UNITS}/arq-worker@') for path in result.remove)
    assert result.forget == ['web1:arq-worker-background@1', 'web1:arq-worker-background@2']
    # an instance of a pool no longer configured drains for the role's default
    assert result.drain_timeouts['arq-worker-background@1.service'] == 120


def test_a_unit_on_disk_but_not_loaded_is_removed_without_a_drain() -> None:
    leftover = Found(unit(4), paths=(f'{UNITS}/multi-user.target.wants/arq-worker@4.service',))
    result = plan('systemd', pools(default=1), host(runs(unit(1)), leftover), HOST, default_drain_timeout=300)
    assert names(result.stop) == ['arq-worker@4.service']
    assert result.drain == []
    assert result.remove == [f'{UNITS}/multi-user.target.wants/arq-worker@4.service']
    assert [s.verb for s in result.steps()] == []


def test_a_failed_wanted_unit_is_started_and_a_failed_surplus_one_removed() -> None:
    failed = Found(unit(2), paths=paths_of(unit(2)))
    result = plan('systemd', pools(default=2), host(runs(unit(1)), failed), HOST, default_drain_timeout=300)
    assert names(result.start) == ['arq-worker@2.service']
    assert result.stop == []

    result = plan('systemd', pools(default=1), host(runs(unit(1)), failed), HOST, default_drain_timeout=300)
    assert names(result.stop) == ['arq-worker@2.service']
    assert result.drain == []


def test_a_stale_pool_prefix_with_files_only_is_removed() -> None:
    files = {**pool_files('systemd'), **pool_files('systemd', 'arq-worker-old')}
    result = plan(
        'systemd', pools(default=1), host(runs(unit(1)), files=files), HOST, default_drain_timeout=300
    )
    assert result.pools_gone == [('systemd', 'arq-worker-old')]
    assert result.remove == sorted(files[('systemd', 'arq-worker-old')])
    assert result.stop == []


@pytest.mark.parametrize(
    ('started_at', 'config_at', 'restarts'),
    [
        (100.0, 150.0, True),  # the env file, the unit or `current` changed after it started
        (100.0, 100.0, False),
        (200.0, 150.0, False),
        (None, 150.0, False),  # start time unknown: never restarted on a guess
    ],
)
def test_a_process_older_than_its_configuration_restarts(
    started_at: float | None, config_at: float, restarts: bool
) -> None:
    now = host(runs(unit(1)), runs(unit(2), started_at=started_at, config_at=config_at))
    result = plan('systemd', pools(default=2), now, HOST, default_drain_timeout=300)
    assert names(result.restart) == (['arq-worker@2.service'] if restarts else [])
    assert [s.verb for s in result.steps()] == (['restart'] if restarts else [])


def test_a_running_instance_not_enabled_is_enabled_and_a_target_down_started() -> None:
    now = host(runs(unit(1), enabled=False), targets=())
    result = plan('systemd', pools(default=1), now, HOST, default_drain_timeout=300)
    assert names(result.enable) == ['arq-worker@1.service']
    assert result.targets == ['arq-worker']
    assert result.start == result.restart == []


@pytest.mark.parametrize(
    ('old', 'new', 'make_old', 'make_new'),
    [('systemd', 'supervisor', unit, program), ('supervisor', 'systemd', program, unit)],
)
def test_a_change_of_process_manager_drains_each_old_instance_before_its_successor_starts(
    old: str, new: str, make_old, make_new
) -> None:
    now = host(*(runs(make_old(n)) for n in (1, 2)))
    result = plan(new, pools(default=2), now, HOST, default_drain_timeout=300)
    assert names(result.start) == names([make_new(1), make_new(2)])
    assert names(result.stop) == names(result.drain) == names([make_old(1), make_old(2)])
    assert [(s.verb, s.instances[0].name) for s in result.steps()] == [
        ('drain', make_old(1).name),
        ('start', make_new(1).name),
        ('drain', make_old(2).name),
        ('start', make_new(2).name),
    ]
    assert result.pools_gone == [(old, 'arq-worker')]
    assert set(pool_files(old)[(old, 'arq-worker')]) <= set(result.remove)
    assert set(paths_of(make_old(1)) + paths_of(make_old(2))) <= set(result.remove)
    assert result.forget == sorted(make_old(n).worker_id(HOST) for n in (1, 2))


def running_through(result: Plan, running: set[Instance]) -> list[int]:
    """How many instances run after each step."""
    counts = []
    for step in result.steps():
        if step.verb == 'drain':
            running = running - set(step.instances)
        elif step.verb == 'start':
            running = running | set(step.instances)
        counts.append(len(running))
        if step.verb == 'restart':
            counts.append(len(running) - 1)
    return counts


@pytest.mark.parametrize('count', [1, 3, 5])
@pytest.mark.parametrize('found_count', [1, 3, 5])
def test_a_switch_keeps_between_n_minus_1_and_n_plus_1_running(count: int, found_count: int) -> None:
    found = {unit(n) for n in range(1, found_count + 1)}
    result = plan(
        'supervisor', pools(default=count), host(*(runs(i) for i in found)), HOST, default_drain_timeout=300
    )
    counts = running_through(result, found)
    assert counts[-1] == count
    low, high = min(found_count, count) - 1, max(found_count, count) + 1
    assert all(low <= c <= high for c in counts), counts
    # while the old ones are replaced one by one, never more than the larger count
    assert max(counts) <= max(found_count, count)


def test_heartbeat_keys_of_instances_gone_are_forgotten_others_left_alone() -> None:
    keys = (
        'web1:arq-worker@1',
        'web1:arq-worker@7',
        'web1:arq-worker_03',
        'web2:arq-worker@7',
        'web1:backup',
    )
    result = plan(
        'systemd', pools(default=1), host(runs(unit(1)), keys=keys), HOST, default_drain_timeout=300
    )
    assert result.forget == ['web1:arq-worker@7', 'web1:arq-worker_03']
    assert result.changes


def test_the_rolling_restart_restarts_every_running_instance_and_stops_nothing() -> None:
    now = host(runs(unit(1)), Found(unit(2)), runs(unit(3)), keys=('web1:arq-worker@9',))
    result = plan('systemd', pools(default=2), now, HOST, default_drain_timeout=300, restart_all=True)
    assert names(result.restart) == ['arq-worker@1.service']
    assert names(result.start) == ['arq-worker@2.service']
    assert result.stop == result.remove == result.forget == result.targets == []


def test_an_unknown_manager_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match='systemd, supervisor'):
        plan('runit', pools(default=1), Host(), HOST, default_drain_timeout=300)


@pytest.mark.parametrize(
    ('name', 'instance'),
    [
        ('arq-worker@1.service', unit(1)),
        ('arq-worker-background@12.service', unit(12, 'arq-worker-background')),
        ('arq-worker_01', program(1)),
        ('arq-worker:arq-worker_02', program(2)),
        ('arq-worker-io:arq-worker-io_100', program(100, 'arq-worker-io')),
        # look-alikes that are not the role's
        ('arq-worker-backup.timer', None),
        ('arq-worker-backup.service', None),
        ('arq-worker@.service', None),
        ('arq-worker@backup.service', None),
        ('arq-worker@0.service', None),
        ('arq-worker_1', None),
        ('other:arq-worker_01', None),
        ('arq-workers@1.service', None),
    ],
)
def test_names(name: str, instance: Instance | None) -> None:
    assert parse_instance(name) == instance
    if instance is not None:
        assert parse_instance(instance.name) == instance
        assert parse_worker_id(instance.worker_id(HOST), HOST) == instance
        assert parse_worker_id(instance.worker_id(HOST), 'web2') is None


def test_pool_file_names() -> None:
    assert systemd_pool_of('arq-worker@.service') == 'arq-worker'
    assert systemd_pool_of('arq-worker-io.target') == 'arq-worker-io'
    assert systemd_pool_of('arq-worker-io.target.wants') == 'arq-worker-io'
    assert systemd_pool_of('arq-worker@.service.d') == 'arq-worker'
    assert systemd_pool_of('arq-worker-backup.timer') is None
    assert systemd_pool_of('arq-worker@1.service') is None
    assert supervisor_file_of('arq-worker.conf') == ('arq-worker', None)
    assert supervisor_file_of('arq-worker_02.conf') == ('arq-worker', program(2))
    assert supervisor_file_of('arq-worker_02-error.log.3') == ('arq-worker', program(2))
    assert supervisor_file_of('arq-worker-rpc.conf') is None
    assert supervisor_file_of('arq-worker.log') is None
    assert supervisor_file_of('arq-worker-backup.ini') is None
    assert Instance('supervisor', 'arq-worker', 3).target == 'arq-worker:arq-worker_03'
    assert unit(3).worker_id(HOST) == 'web1:arq-worker@3'
