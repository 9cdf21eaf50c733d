"""redis_server: Debian's redis-server as the arq queue (hosts: podman://redis-server)."""

from __future__ import annotations

import re
import shlex

import pytest

PASSWORD = 'redis-test-pass"word\\with\'quotes'  # the admin's (molecule.yml)
WORKER = ('worker', 'redis-test-worker')
MONITOR = ('monitor', 'redis-test-monitor')
CONF = '/etc/redis/redis.conf'
CHECK = '/usr/local/sbin/redis-server-check-config'
TLS = '/etc/molecule-tls'


def cli(host, *args: str, password: str | None = PASSWORD, user: str | None = 'admin'):
    env = f'REDISCLI_AUTH={shlex.quote(password)} ' if password is not None else ''
    login = ['--user', user] if user and password is not None else []
    return host.run(env + shlex.join(['redis-cli', '--no-auth-warning', *login, *args]))


def as_user(host, login: tuple[str, str], *args: str):
    user, password = login
    return cli(host, *args, user=user, password=password)


def config_get(host, name: str) -> str:
    out = cli(host, 'CONFIG', 'GET', name)
    assert out.rc == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == name, lines
    return lines[1]


def test_service_is_enabled_and_running(host):
    service = host.service('redis-server')
    assert service.is_enabled
    assert service.is_running


def test_listens_on_loopback_only(host):
    assert host.socket('tcp://127.0.0.1:6379').is_listening
    assert host.socket('tcp://127.0.0.1:6380').is_listening
    assert not host.socket('tcp://0.0.0.0:6379').is_listening


def test_tls_port_serves_authenticated_clients(host):
    tls = ['--tls', '--cacert', f'{TLS}/ca.crt', '-p', '6380']
    assert cli(host, *tls, 'PING').stdout.strip() == 'PONG'
    refused = cli(host, *tls, 'PING', password=None)
    assert 'NOAUTH' in refused.stdout + refused.stderr
    assert config_get(host, 'tls-auth-clients') == 'no'


def test_redis_reads_a_key_that_only_root_and_ssl_cert_may_read(host):
    key = host.file(f'{TLS}/server.key')
    assert (key.user, key.group, key.mode) == ('root', 'ssl-cert', 0o640)
    assert 'ssl-cert' in host.user('redis').groups
    pid = host.check_output('systemctl show --property=MainPID --value redis-server')
    group = host.check_output('getent group ssl-cert').split(':')[2]
    assert group in host.file(f'/proc/{pid}/status').content_string.split('Groups:')[1].split('\n')[0].split()


@pytest.mark.parametrize(
    ('name', 'value'),
    [
        ('maxmemory', str(256 * 1024 * 1024)),
        ('maxmemory-policy', 'noeviction'),
        ('tcp-keepalive', '60'),
        ('timeout', '0'),
        ('protected-mode', 'yes'),
        ('appendonly', 'yes'),
        ('appendfsync', 'everysec'),
        ('save', '3600 1 300 100 60 10000'),
        ('maxclients', '10000'),
        ('dir', '/var/lib/redis'),
    ],
)
def test_running_config(host, name, value):
    assert config_get(host, name) == value


def test_keyspace_events_for_sorted_sets_are_on(host):
    assert set(config_get(host, 'notify-keyspace-events')) == set('Kz')


def test_a_zadd_publishes_a_keyspace_event(host):
    # A bounded subscriber in the background; ZADDs are repeated until it has seen one.
    script = (
        'out=$(mktemp); timeout 5 redis-cli --user worker --no-auth-warning SUBSCRIBE "__keyspace@0__:arq:queue:molecule" > "$out" & '
        'for i in $(seq 1 40); do redis-cli --user worker --no-auth-warning ZADD arq:queue:molecule "$i" "job$i" > /dev/null; '
        'grep -q zadd "$out" && break; sleep 0.1; done; '
        'redis-cli --user worker --no-auth-warning DEL arq:queue:molecule > /dev/null; kill %1 2>/dev/null; wait; cat "$out"; rm -f "$out"'
    )
    # as the worker user: the wake-up's subscription is within its rules
    out = host.run(f'REDISCLI_AUTH={shlex.quote(WORKER[1])} bash -c {shlex.quote(script)}')
    assert 'zadd' in out.stdout.splitlines(), out.stdout


def test_a_client_without_a_user_gets_noauth_and_the_default_user_is_off(host):
    out = cli(host, 'PING', password=None)
    assert 'NOAUTH' in out.stdout + out.stderr
    for user in ('default', None, 'admin'):
        wrong = cli(host, 'PING', password=PASSWORD if user != 'admin' else 'wrong', user=user)
        assert 'WRONGPASS' in wrong.stdout + wrong.stderr, (user, wrong.stdout, wrong.stderr)


@pytest.mark.parametrize('login', [('admin', PASSWORD), WORKER, MONITOR], ids=['admin', 'worker', 'monitor'])
def test_each_user_logs_in(host, login):
    assert as_user(host, login, 'PING').stdout.strip() == 'PONG'


@pytest.mark.parametrize(
    'command',
    [('FLUSHALL',), ('CONFIG', 'GET', 'maxmemory'), ('KEYS', '*'), ('SET', 'outside', 'x'), ('SHUTDOWN',)],
    ids=' '.join,
)
def test_the_worker_user_is_refused_what_flowworker_acl_leaves_out(host, command):
    out = as_user(host, WORKER, *command)
    assert 'NOPERM' in out.stdout + out.stderr, out.stdout
    assert host.service('redis-server').is_running


def test_the_worker_and_monitor_users_work_on_arq_keys(host):
    assert as_user(host, WORKER, 'SET', 'arq:molecule', 'x').stdout.strip() == 'OK'
    assert as_user(host, MONITOR, 'GET', 'arq:molecule').stdout.strip() == 'x'
    assert 'NOPERM' in as_user(host, MONITOR, 'SUBSCRIBE', '__keyspace@0__:arq:queue:default').stdout
    assert as_user(host, MONITOR, 'DEL', 'arq:molecule').stdout.strip() == '1'


def test_config_files_are_private_and_the_password_stays_out_of_redis_conf(host):
    conf = host.file(CONF)
    assert conf.content_string.splitlines()[0].startswith('# Ansible managed')
    assert (conf.user, conf.group, conf.mode) == ('redis', 'redis', 0o640)
    assert 'requirepass' not in conf.content_string
    assert 'user ' not in conf.content_string
    assert conf.contains('^aclfile /etc/redis/redis-auth.conf$')
    auth = host.file('/etc/redis/redis-auth.conf')
    assert (auth.user, auth.group, auth.mode) == ('redis', 'redis', 0o640)
    lines = auth.content_string.splitlines()
    assert 'user default reset' in lines
    assert any(re.fullmatch('user worker reset on #[0-9a-f]{64} resetkeys .*', line) for line in lines), lines
    # hashed: no password in the file
    assert not any(password in auth.content_string for password in (PASSWORD, WORKER[1], MONITOR[1]))


def test_sysctl_file_is_rendered(host):
    lines = host.file('/etc/sysctl.d/60-redis-server.conf').content_string.splitlines()
    assert 'vm.overcommit_memory=1' in lines
    assert 'net.core.somaxconn=4096' in lines


def test_limit_nofile_drop_in_is_in_force(host):
    dropin = host.file('/etc/systemd/system/redis-server.service.d/60-redis-server.conf')
    assert dropin.contains('^LimitNOFILE=20000$')
    assert host.check_output('systemctl show --property=LimitNOFILE --value redis-server') == '20000'
    pid = host.check_output('systemctl show --property=MainPID --value redis-server')
    limits = host.file(f'/proc/{pid}/limits').content_string
    assert any(
        line.startswith('Max open files') and line.split()[3] == '20000' for line in limits.splitlines()
    )


def test_checker_accepts_the_live_config(host):
    assert host.run(f'{CHECK} {CONF}').rc == 0


def test_checker_rejects_a_bad_config_without_touching_the_live_instance(host):
    pid = host.check_output('systemctl show --property=MainPID --value redis-server')
    bad = host.run(
        'f=$(mktemp); printf \'port 6379\\nmaxmemory-policy allkeys-lru-typo\\n\' > "$f"; '
        f'{CHECK} "$f"; rc=$?; rm -f "$f"; exit $rc'
    )
    assert bad.rc == 1
    assert 'FATAL CONFIG FILE ERROR' in bad.stderr
    assert host.check_output('systemctl show --property=MainPID --value redis-server') == pid
    assert cli(host, 'PING').stdout.strip() == 'PONG'


def test_checker_loads_the_tls_files(host):
    # A key that does not match the certificate is caught by the check, not by a failed restart.
    bad = host.run(
        "f=$(mktemp); printf 'port 6379\\ntls-port 6380\\ntls-cert-file %s\\ntls-key-file %s\\ntls-ca-cert-file %s\\n' "
        f'{TLS}/server.crt {TLS}/ca.key {TLS}/ca.crt > "$f"; {CHECK} "$f"; rc=$?; rm -f "$f"; exit $rc'
    )
    assert bad.rc == 1
    assert 'TLS' in bad.stderr or 'tls' in bad.stderr


def test_data_survives_a_restart(host):
    assert cli(host, 'SET', 'molecule:durable', 'yes').rc == 0
    assert host.run('systemctl restart redis-server').rc == 0
    assert cli(host, 'GET', 'molecule:durable').stdout.strip() == 'yes'
    cli(host, 'DEL', 'molecule:durable')


def test_redis_starts_from_its_state_file_with_the_roles_configuration_after_it(host):
    state = host.file('/etc/redis/redis-state.conf')
    assert (state.user, state.group, state.mode) == ('redis', 'redis', 0o640)
    # a standalone Redis is its own master: nothing but the role's header
    assert [line for line in state.content_string.splitlines() if not line.startswith('#')] == []
    start = host.check_output('systemctl show --property=ExecStart --value redis-server')
    assert '/etc/redis/redis-state.conf --include /etc/redis/redis.conf' in start
    assert cli(host, 'ROLE').stdout.splitlines()[0] == 'master'
