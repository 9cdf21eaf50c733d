"""postgresql: the task-record database, its owner and DML-only worker role (hosts: podman://postgresql)."""

from __future__ import annotations

import re
import shlex

import pytest

DB = 'flows'
OWNER = ('flow_owner', 'owner-test-password')
WORKER = ('flow_worker', 'worker\'test"password')


@pytest.fixture(scope='module')
def address(host) -> str:
    # The container's own address: connections from it are TCP from a "worker host".
    return host.check_output("ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -1")


def psql(host, sql: str, *, role=None, address=None, sslmode='require', database=DB):
    """Run SQL as postgres over the socket, or as role (name, password) over TCP to address."""
    if role is None:
        cmd = f'runuser -u postgres -- psql -XAtq -d {database} -c {shlex.quote(sql)}'
        return host.run(cmd)
    name, password = role
    dsn = f'host={address} port=5432 dbname={database} user={name} sslmode={sslmode}'
    return host.run(f'PGPASSWORD={shlex.quote(password)} psql -XAtq {shlex.quote(dsn)} -c {shlex.quote(sql)}')


def value(host, sql: str) -> str:
    out = psql(host, sql)
    assert out.rc == 0, out.stderr
    return out.stdout.strip()


def test_service_is_enabled_and_running(host):
    assert host.service('postgresql@15-main').is_running
    assert host.service('postgresql@15-main').is_enabled
    assert host.service('postgresql').is_enabled


def test_the_cluster_runs_sandboxed_and_still_reloads(host):
    # Debian's unit alone: 9.6 (UNSAFE); the role's drop-in, postgresql@.service.d/60-flowworker.conf
    last = host.check_output('systemd-analyze security --no-pager postgresql@15-main.service').splitlines()[
        -1
    ]
    exposure = re.search(r'exposure level for \S+: ([0-9.]+)', last)
    assert exposure, last
    assert float(exposure[1]) <= 5.0
    assert (
        host.check_output('systemctl show --property User --value postgresql@15-main.service') == 'postgres'
    )
    assert host.run('systemctl reload postgresql@15-main.service').rc == 0
    assert 'server is running' in host.check_output('pg_ctlcluster 15 main status')
    assert value(host, 'SELECT 1') == '1'


def test_listens_on_all_addresses(host):
    assert host.socket('tcp://0.0.0.0:5432').is_listening
    assert value(host, 'SHOW listen_addresses') == '*'


def test_max_connections_and_reserve(host):
    assert value(host, 'SHOW max_connections') == '170'
    assert value(host, 'SHOW superuser_reserved_connections') == '3'


def test_tls_and_scram_are_on(host):
    assert value(host, 'SHOW ssl') == 'on'
    assert value(host, 'SHOW password_encryption') == 'scram-sha-256'


def test_pg_hba_has_hostssl_scram_lines_for_the_workers_and_the_owner(host, address):
    rows = value(
        host,
        'SELECT type, database[1], user_name[1], address, netmask, auth_method FROM pg_hba_file_rules '
        "WHERE database[1] = 'flows' ORDER BY line_number",
    ).splitlines()
    assert rows == [
        f'hostssl|flows|flow_worker|{address}|255.255.255.255|scram-sha-256',
        'hostssl|flows|flow_worker|127.0.0.1|255.255.255.255|scram-sha-256',
        f'hostssl|flows|flow_owner|{address}|255.255.255.255|scram-sha-256',
        'hostssl|flows|flow_owner|127.0.0.1|255.255.255.255|scram-sha-256',
    ]
    assert value(host, 'SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL') == '0'
    hba = host.file('/etc/postgresql/15/main/pg_hba.conf')
    assert hba.content_string.splitlines()[0].startswith('# Ansible managed')
    assert (hba.user, hba.mode) == ('postgres', 0o640)


def test_database_is_owned_by_the_owner_role(host):
    assert (
        value(host, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'flows'") == 'flow_owner'
    )


def test_worker_role_has_no_attributes_and_owns_nothing(host):
    assert (
        value(
            host,
            'SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolcanlogin FROM pg_roles '
            "WHERE rolname = 'flow_worker'",
        )
        == 'f|f|f|f|t'
    )
    assert (
        value(host, "SELECT count(*) FROM pg_database WHERE pg_get_userbyid(datdba) = 'flow_worker'") == '0'
    )
    assert (
        value(
            host,
            "SELECT has_database_privilege('flow_worker', 'flows', 'CREATE'), "
            "has_database_privilege('flow_worker', 'flows', 'TEMP'), "
            "has_schema_privilege('flow_worker', 'public', 'CREATE')",
        )
        == 'f|f|f'
    )


def test_passwords_are_stored_as_scram(host):
    assert (
        value(
            host,
            "SELECT count(*) FROM pg_authid WHERE rolname IN ('flow_owner', 'flow_worker') "
            "AND rolpassword LIKE 'SCRAM-SHA-256$%'",
        )
        == '2'
    )


def test_worker_connects_over_tls_with_its_password(host, address):
    out = psql(host, 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()', role=WORKER, address=address)
    assert out.rc == 0, out.stderr
    assert out.stdout.strip() == 't'


def test_worker_is_refused_without_tls_and_with_a_wrong_password(host, address):
    plain = psql(host, 'SELECT 1', role=WORKER, address=address, sslmode='disable')
    assert plain.rc != 0
    assert 'no pg_hba.conf entry' in plain.stderr
    wrong = psql(host, 'SELECT 1', role=(WORKER[0], 'wrong'), address=address)
    assert wrong.rc != 0
    assert 'password authentication failed' in wrong.stderr


def test_worker_cannot_create_a_table(host, address):
    out = psql(host, 'CREATE TABLE worker_made (id int)', role=WORKER, address=address)
    assert out.rc != 0
    assert 'permission denied for schema public' in out.stderr


def test_worker_cannot_reach_another_database(host, address):
    out = psql(host, 'SELECT 1', role=WORKER, address=address, database='postgres')
    assert out.rc != 0


def test_owner_creates_tables_and_the_grant_gives_the_worker_dml_only(host, address):
    # What `flowworker db upgrade --grant-to flow_worker` does, in miniature.
    setup = psql(
        host,
        'DROP TABLE IF EXISTS molecule_records; CREATE TABLE molecule_records (id int, status text); '
        'GRANT SELECT, INSERT, UPDATE ON molecule_records TO flow_worker',
        role=OWNER,
        address=address,
    )
    assert setup.rc == 0, setup.stderr
    try:
        dml = psql(
            host,
            "INSERT INTO molecule_records VALUES (1, 'running'); "
            "UPDATE molecule_records SET status = 'succeeded' WHERE id = 1; "
            'SELECT status FROM molecule_records',
            role=WORKER,
            address=address,
        )
        assert dml.rc == 0, dml.stderr
        assert dml.stdout.strip() == 'succeeded'
        for sql in (
            'DELETE FROM molecule_records',
            'DROP TABLE molecule_records',
            'TRUNCATE molecule_records',
        ):
            out = psql(host, sql, role=WORKER, address=address)
            assert out.rc != 0, sql
    finally:
        psql(host, 'DROP TABLE IF EXISTS molecule_records', role=OWNER, address=address)


def test_conf_d_files_are_managed(host):
    restart = host.file('/etc/postgresql/15/main/conf.d/60-flowworker.conf')
    assert restart.content_string.splitlines()[0].startswith('# Ansible managed')
    assert restart.contains('^max_connections = 170$')
    reload_ = host.file('/etc/postgresql/15/main/conf.d/61-flowworker-reload.conf')
    assert reload_.contains('^ssl = on$')
