"""Settings: the guide's options and defaults, their precedence, and one clear line for a bad one."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from flowworker.cli import WORKER_OPTIONS
from flowworker.settings import Settings, SettingsError, env_name, load_settings

from .conftest import flowworker
from .servers import WORKER_ROOT, RedisServer

CONNECTIONS = {'DATABASE_URL': 'postgresql://u:p@db:5432/app', 'REDIS_URL': 'redis://cache:6379/0'}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the machine running the tests, and no ./.env."""
    for field in Settings.model_fields:
        monkeypatch.delenv(env_name(field), raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_the_guides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in CONNECTIONS.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()

    assert settings.queue_name == 'default'
    assert settings.queue_key == 'arq:queue:default'
    assert settings.max_jobs == 10
    assert settings.job_timeout == 3600
    assert settings.log_level == 'INFO'
    assert (settings.database_pool_size, settings.database_max_overflow, settings.database_pool_recycle) == (
        20,
        30,
        3600,
    )
    assert settings.project_root == tmp_path
    assert settings.worker_id.endswith(f':{__import__("os").getpid()}')


def test_command_line_beats_environment_beats_env_file_beats_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / 'production.env'
    env_file.write_text(
        'DATABASE_URL=postgresql://u:p@from-file/app\nREDIS_URL=redis://from-file\n'
        'FLOWWORKER_MAX_JOBS=3\nLOG_LEVEL=ERROR\nFLOWWORKER_QUEUE_NAME=background\n'
        'FLOWWORKER_METRICS_PORT=9300\nFLOWWORKER_METRICS_PORT_OFFSET=1\n'
    )
    monkeypatch.setenv('FLOWWORKER_MAX_JOBS', '4')
    monkeypatch.setenv('LOG_LEVEL', 'warning')
    monkeypatch.setenv('FLOWWORKER_METRICS_PORT_OFFSET', '2')

    settings = load_settings(env_file, max_jobs='5')

    assert settings.max_jobs == 5  # command line
    # the port from the file, its offset from the environment; a template unit's --metrics-port-offset %i
    assert settings.metrics_serving_port == 9302
    assert load_settings(env_file, metrics_port_offset='3').metrics_serving_port == 9303
    assert settings.log_level == 'WARNING'  # environment over the file
    assert settings.queue_name == 'background'  # env file over the default
    assert settings.job_timeout == 3600  # default
    assert settings.sqlalchemy_url()[0].host == 'from-file'


def test_the_metrics_port_offset_is_ignored_without_a_port_and_may_reach_the_last_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in CONNECTIONS.items():
        monkeypatch.setenv(name, value)
    assert load_settings(metrics_port_offset='7').metrics_serving_port == 0
    assert load_settings(metrics_port='65530', metrics_port_offset='5').metrics_serving_port == 65535


def test_a_dot_env_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / '.env').write_text('DATABASE_URL=postgresql://u:p@db/app\nREDIS_URL=redis://cache\n')
    assert load_settings().redis_settings().host == 'cache'


def test_database_from_components_with_tls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ca = Path(ssl.get_default_verify_paths().cafile or '/etc/ssl/certs/ca-certificates.crt')
    for name, value in {
        'DATABASE_HOST': 'db.internal',
        'DATABASE_PORT': '6432',
        'DATABASE_NAME': 'app',
        'DATABASE_USER': 'worker',
        'DATABASE_PASSWORD': 'p@ss/word',
        'DATABASE_SSLMODE': 'verify-full',
        'DATABASE_SSLROOTCERT': str(ca),
        'REDIS_HOST': 'cache',
    }.items():
        monkeypatch.setenv(name, value)

    url, connect_args = load_settings().sqlalchemy_url()

    assert url.drivername == 'postgresql+asyncpg'
    assert (url.host, url.port, url.database, url.username, url.password) == (
        'db.internal',
        6432,
        'app',
        'worker',
        'p@ss/word',
    )
    assert isinstance(connect_args['ssl'], ssl.SSLContext)
    assert connect_args['ssl'].check_hostname


def test_sslmode_in_the_url_becomes_asyncpgs_ssl_argument() -> None:
    settings = load_settings(database_url='postgresql://u:p@db/app?sslmode=require', redis_url='redis://r')
    url, connect_args = settings.sqlalchemy_url()
    assert connect_args == {'ssl': 'require'}
    assert 'sslmode' not in url.query


@pytest.mark.parametrize(
    ('environment', 'expected'),
    [
        ({'REDIS_URL': 'rediss://:secret@cache:6380/2'}, ('cache', 6380, 2, None, 'secret', True)),
        # what stack.yml's url_quote writes for a user and a password with the URL's own characters
        (
            {'REDIS_URL': 'redis://flow%20worker:p%40ss%2Fw%3Ard%25@cache:6379/0'},
            ('cache', 6379, 0, 'flow worker', 'p@ss/w:rd%', False),
        ),
        (
            {
                'REDIS_HOST': 'cache',
                'REDIS_PORT': '6390',
                'REDIS_DB': '1',
                'REDIS_USERNAME': 'app',
                'REDIS_PASSWORD': 'pw',
                'REDIS_TLS': 'true',
            },
            ('cache', 6390, 1, 'app', 'pw', True),
        ),
    ],
    ids=['url', 'url-encoded', 'components'],
)
def test_redis_settings(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], expected: tuple[object, ...]
) -> None:
    monkeypatch.setenv('DATABASE_URL', CONNECTIONS['DATABASE_URL'])
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    redis = load_settings().redis_settings()
    assert (redis.host, redis.port, redis.database, redis.username, redis.password, redis.ssl) == expected


def test_redis_through_sentinels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / 'sentinel.env'
    env_file.write_text(
        'REDIS_SENTINELS=s1:26379, s2:26380,[fd00::3]:26381\nREDIS_SENTINEL_MASTER=from-file\n'
    )
    for name, value in {
        'DATABASE_URL': CONNECTIONS['DATABASE_URL'],
        'REDIS_SENTINEL_MASTER': 'main',  # the environment over the file
        'REDIS_SENTINEL_PASSWORD': 'sentinel-pw',
        'REDIS_SENTINEL_TLS': 'true',
        # the master's and the replicas' own settings
        'REDIS_DB': '2',
        'REDIS_USERNAME': 'app',
        'REDIS_PASSWORD': 'pw',
        'REDIS_TLS': 'true',
    }.items():
        monkeypatch.setenv(name, value)

    settings = load_settings(env_file)
    settings.require_redis()  # without REDIS_URL or REDIS_HOST
    redis = settings.redis_settings()

    # what an arq producer would give arq, the database for the wake-up's keyspace channel
    assert (redis.host, redis.sentinel, redis.sentinel_master) == (
        [('s1', 26379), ('s2', 26380), ('fd00::3', 26381)],
        True,
        'main',
    )
    assert (redis.database, redis.username, redis.password, redis.ssl) == (2, 'app', 'pw', True)
    assert settings.redis_sentinel_password is not None
    assert settings.redis_sentinel_password.get_secret_value() == 'sentinel-pw'
    assert settings.redis_sentinel_tls


SENTINELS = {'REDIS_URL': None, 'REDIS_SENTINELS': 's1:26379,s2:26379', 'REDIS_SENTINEL_MASTER': 'main'}
FORM = (
    'REDIS_SENTINELS: must be comma-separated host:port entries, e.g. sentinel-1:26379,sentinel-2:26379 '
    '([::1]:26379 for IPv6)'
)
ONLY_ONE = 'only one may be set (with sentinels, they name the Redis to connect to)'
# (environment over SENTINELS, the whole error)
BAD_SENTINELS: list[tuple[dict[str, str | None], str]] = [
    ({'REDIS_SENTINELS': 's1:26379,s2'}, f'{FORM} (got entry 2, one with no :port)'),
    (
        {'REDIS_SENTINELS': 's1:65536'},
        f'{FORM} (got entry 1, a port that is not 1 to 65535)',
    ),
    ({'REDIS_SENTINELS': ':26379'}, f'{FORM} (got entry 1, one that names no host)'),
    (
        {'REDIS_SENTINELS': '::1:26379'},
        f'{FORM} (got entry 1, an IPv6 address without [brackets])',
    ),
    # a URL pasted by mistake: told without its password
    (
        {'REDIS_SENTINELS': 'redis://:hunter2@s1:26379'},
        f'{FORM} (got entry 1, a URL or a path)',
    ),
    (
        {'REDIS_SENTINEL_MASTER': None},
        'REDIS_SENTINEL_MASTER: must be set with REDIS_SENTINELS (the name the sentinels know the master by)',
    ),
    (
        {'REDIS_SENTINEL_MASTER': ''},
        'REDIS_SENTINEL_MASTER: must be set with REDIS_SENTINELS (the name the sentinels know the master by)',
    ),
    (
        {'REDIS_URL': 'redis://:hunter2@cache:6379/0'},
        f'REDIS_URL and REDIS_SENTINELS: {ONLY_ONE}',
    ),
    (
        {'REDIS_HOST': 'cache'},
        f'REDIS_HOST and REDIS_SENTINELS: {ONLY_ONE}',
    ),
]


@pytest.mark.parametrize(
    ('environment', 'message'),
    BAD_SENTINELS,
    ids=[f'{next(iter(e))}-{i}' for i, (e, _) in enumerate(BAD_SENTINELS)],
)
def test_a_bad_sentinel_setting_is_one_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str | None], message: str
) -> None:
    monkeypatch.setenv('DATABASE_URL', CONNECTIONS['DATABASE_URL'])
    for name, value in {**SENTINELS, **environment}.items():
        if value is not None:
            monkeypatch.setenv(name, value)

    with pytest.raises(SettingsError) as raised:
        load_settings()

    assert str(raised.value) == message
    assert 'hunter2' not in str(raised.value)


def test_a_missing_env_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r'--env-file .*nope\.env: no such file'):
        load_settings(tmp_path / 'nope.env')


# (environment, command-line arguments, the one line expected on stderr)
BAD = [
    (
        {'DATABASE_URL': None},
        [],
        'DATABASE_URL is not set (nor DATABASE_HOST, DATABASE_NAME and DATABASE_USER)',
    ),
    ({'REDIS_URL': None}, [], 'REDIS_URL is not set (nor REDIS_HOST, nor REDIS_SENTINELS)'),
    ({'FLOWWORKER_MAX_JOBS': '0'}, [], 'FLOWWORKER_MAX_JOBS: Input should be greater than or equal to 1'),
    ({}, ['--max-jobs', 'many'], '--max-jobs: Input should be a valid integer'),
    ({}, ['--job-timeout', '-1'], '--job-timeout: Input should be greater than 0'),
    ({'LOG_LEVEL': 'LOUD'}, [], "LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    (
        {'DATABASE_URL': 'mysql://u:hunter2@db/app'},
        [],
        "DATABASE_URL: must be a postgresql://user:password@host:port/name URL (got scheme 'mysql')",
    ),
    (
        {'REDIS_URL': 'http://u:hunter2@cache'},
        [],
        'REDIS_URL: must be a redis://[[user]:password@]host:port/db URL',
    ),
    ({'DATABASE_POOL_SIZE': '0'}, [], 'DATABASE_POOL_SIZE: Input should be greater than or equal to 1'),
    ({'DATABASE_SSLMODE': 'maybe'}, [], "DATABASE_SSLMODE: Input should be 'disable', 'allow'"),
    ({'FLOWWORKER_QUEUE_NAME': 'a b'}, [], 'FLOWWORKER_QUEUE_NAME: String should match pattern'),
    ({'FLOWWORKER_FLOW_MODULES': 'no_such_flows'}, [], "cannot import flow module 'no_such_flows'"),
    ({}, ['--env-file', '/nonexistent/.env'], '--env-file /nonexistent/.env: no such file'),
    ({}, ['--max-jobs'], 'argument --max-jobs: expected one argument'),
    (
        {'FLOWWORKER_METRICS_PORT_OFFSET': '-1'},
        [],
        'FLOWWORKER_METRICS_PORT_OFFSET: Input should be greater than or equal to 0',
    ),
    (
        {'FLOWWORKER_METRICS_PORT_OFFSET': '10'},
        ['--metrics-port', '65530'],
        '--metrics-port + FLOWWORKER_METRICS_PORT_OFFSET: must be from 1 to 65535 together '
        '(got 65530 + 10 = 65540)',
    ),
    (
        {},
        ['--metrics-port', '65535', '--metrics-port-offset', '1'],
        '--metrics-port + --metrics-port-offset: must be from 1 to 65535 together (got 65535 + 1 = 65536)',
    ),
]


@pytest.mark.parametrize(('environment', 'args', 'message'), BAD, ids=[m.split(':')[0][:40] for *_, m in BAD])
async def test_a_bad_setting_is_one_line_and_exit_2_before_anything_starts(
    redis_server: RedisServer, environment: dict[str, str | None], args: list[str], message: str
) -> None:
    base = {'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/app', 'REDIS_URL': redis_server.worker_url}
    env = {k: v for k, v in {**base, **environment}.items() if v is not None}
    redis = Redis.from_url(redis_server.url)
    await redis.flushall()

    result = flowworker('worker', *args, env=env, inherit=False)

    assert result.returncode == 2
    assert result.stdout == ''
    [line] = result.stderr.splitlines()
    assert message in line
    assert 'hunter2' not in line
    assert await redis.keys('*') == []
    await redis.aclose()


def test_help_names_every_option_with_its_variable_and_default() -> None:
    result = subprocess.run(
        [sys.executable, 'scripts/start_worker.py', '--help'],
        cwd=WORKER_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    text = ' '.join(result.stdout.split())
    assert text.startswith('usage: start_worker.py')
    for field in WORKER_OPTIONS:
        assert f'--{field.replace("_", "-")}' in text
        assert f'env {env_name(field)};' in text
    for default in ("default 'default'", 'default 10]', 'default 3600]', 'default <hostname>:<pid>'):
        assert default in text
    assert '--env-file PATH' in text
    assert '--metrics-port 9300 --metrics-port-offset %i' in text
