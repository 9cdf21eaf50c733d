"""Worker settings: command line > environment > env file > defaults.

Every field documents its environment variable and default; ``cli.py`` builds its options and
``--help`` from these fields, so the two cannot drift.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import unquote

from arq.connections import RedisSettings
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .urls import database_url_problem, parse_sentinels, redis_url_problem

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

QUEUE_KEY_PREFIX = 'arq:queue:'
SSLMODES = ('disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full')
MIN_TOKEN_LENGTH = 16
MAX_PORT = 65535


def _env(name: str, description: str, **kwargs: Any) -> Any:
    """A field read from environment variable ``name`` (and from the field's own name, for the CLI)."""
    return Field(validation_alias=AliasChoices(name), description=description, **kwargs)


class SettingsError(Exception):
    """A setting is missing or has a bad value; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file='.env',
        env_file_encoding='utf-8',
        extra='ignore',
        validate_by_name=True,
        validate_default=True,
        hide_input_in_errors=True,
    )

    # --- PostgreSQL -------------------------------------------------------------------------
    database_url: SecretStr | None = _env(
        'DATABASE_URL',
        'PostgreSQL DSN, postgresql://user:password@host:port/name[?sslmode=...]',
        default=None,
    )
    database_host: str | None = _env(
        'DATABASE_HOST', 'PostgreSQL host (when DATABASE_URL is unset)', default=None
    )
    database_port: int = _env('DATABASE_PORT', 'PostgreSQL port', default=5432, ge=1, le=65535)
    database_name: str | None = _env('DATABASE_NAME', 'PostgreSQL database name', default=None)
    database_user: str | None = _env('DATABASE_USER', 'PostgreSQL user', default=None)
    database_password: SecretStr | None = _env('DATABASE_PASSWORD', 'PostgreSQL password', default=None)
    database_sslmode: Literal['disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full'] | None = (
        _env('DATABASE_SSLMODE', f'TLS to PostgreSQL: one of {", ".join(SSLMODES)}', default=None)
    )
    database_sslrootcert: Path | None = _env(
        'DATABASE_SSLROOTCERT', 'CA bundle that signs the PostgreSQL server certificate', default=None
    )
    database_pool_size: int = _env(
        'DATABASE_POOL_SIZE', 'connections kept open per process', default=20, ge=1
    )
    database_max_overflow: int = _env(
        'DATABASE_MAX_OVERFLOW', 'extra connections opened under load per process', default=30, ge=0
    )
    database_pool_recycle: int = _env(
        'DATABASE_POOL_RECYCLE', 'seconds after which a pooled connection is replaced', default=3600, ge=-1
    )

    # --- Redis ------------------------------------------------------------------------------
    redis_url: SecretStr | None = _env(
        'REDIS_URL', 'Redis DSN, redis://[user:password@]host:port/db or rediss:// for TLS', default=None
    )
    redis_host: str | None = _env('REDIS_HOST', 'Redis host (when REDIS_URL is unset)', default=None)
    redis_port: int = _env('REDIS_PORT', 'Redis port', default=6379, ge=1, le=65535)
    redis_db: int = _env('REDIS_DB', 'Redis database number', default=0, ge=0)
    redis_username: str | None = _env('REDIS_USERNAME', 'Redis ACL user', default=None)
    redis_password: SecretStr | None = _env('REDIS_PASSWORD', 'Redis password (AUTH)', default=None)
    redis_tls: bool = _env('REDIS_TLS', 'connect to Redis over TLS (implied by rediss://)', default=False)
    redis_tls_ca_certs: Path | None = _env(
        'REDIS_TLS_CA_CERTS', 'CA bundle that signs the Redis server certificate', default=None
    )
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode] = _env(
        'REDIS_SENTINELS',
        'Redis Sentinels, comma-separated host:port, that name the master to connect to '
        '(instead of REDIS_URL or REDIS_HOST)',
        default=[],
    )
    redis_sentinel_master: str | None = _env(
        'REDIS_SENTINEL_MASTER', 'the name the sentinels know the master by', default=None
    )
    redis_sentinel_username: str | None = _env(
        'REDIS_SENTINEL_USERNAME', 'ACL user on the sentinels (their own AUTH)', default=None
    )
    redis_sentinel_password: SecretStr | None = _env(
        'REDIS_SENTINEL_PASSWORD', 'password of the sentinels (their own AUTH)', default=None
    )
    redis_sentinel_tls: bool = _env(
        'REDIS_SENTINEL_TLS', 'connect to the sentinels over TLS (with REDIS_TLS_CA_CERTS)', default=False
    )

    # --- the worker -------------------------------------------------------------------------
    queue_name: str = _env(
        'FLOWWORKER_QUEUE_NAME',
        'queue to process; its Redis key is arq:queue:<name>',
        default='default',
        pattern=r'^[A-Za-z0-9_.:-]+$',
    )
    max_jobs: int = _env('FLOWWORKER_MAX_JOBS', 'maximum concurrent jobs per worker', default=10, ge=1)
    job_timeout: float = _env('FLOWWORKER_JOB_TIMEOUT', 'job timeout in seconds', default=3600, gt=0)
    drain_timeout: float = _env(
        'FLOWWORKER_DRAIN_TIMEOUT',
        'seconds running jobs may take to finish after SIGTERM before they are re-queued',
        default=300,
        ge=0,
    )
    heartbeat_interval: float = _env(
        'FLOWWORKER_HEARTBEAT_INTERVAL',
        'seconds between heartbeats (key TTL is 3 intervals)',
        default=5,
        gt=0,
    )
    worker_id: str = _env(
        'FLOWWORKER_WORKER_ID',
        'name of this process in heartbeats and task records',
        default='<hostname>:<pid>',
        min_length=1,
    )
    health_file: Path | None = _env(
        'FLOWWORKER_HEALTH_FILE',
        'file the worker rewrites after each heartbeat with how it went, for `flowworker health` '
        "(a container's HEALTHCHECK); none when unset",
        default=None,
    )
    poll_delay: float = _env(
        'FLOWWORKER_POLL_DELAY',
        'seconds between queue polls when Redis keyspace events cannot wake the worker',
        default=0.05,
        gt=0,
    )
    metrics_port: int = _env(
        'FLOWWORKER_METRICS_PORT',
        "serve this process's Prometheus metrics on /metrics at this port (0: not served)",
        default=0,
        ge=0,
        le=65535,
    )
    metrics_port_offset: int = _env(
        'FLOWWORKER_METRICS_PORT_OFFSET',
        'added to the metrics port, so one systemd template unit gives each instance its own '
        '(--metrics-port 9300 --metrics-port-offset %i); ignored while the port is 0',
        default=0,
        ge=0,
    )
    metrics_address: str = _env(
        'FLOWWORKER_METRICS_ADDRESS', 'address the metrics port listens on', default='127.0.0.1', min_length=1
    )
    max_tries: int = _env(
        'FLOWWORKER_MAX_TRIES', 'attempts a job may take when its flow asks for retries', default=5, ge=1
    )
    flow_modules: Annotated[list[str], NoDecode] = _env(
        'FLOWWORKER_FLOW_MODULES', 'comma-separated modules whose flows this worker runs', default=[]
    )

    # --- the monitoring service (flowworker monitor) ----------------------------------------
    monitor_host: str = _env(
        'MONITOR_HOST', 'address the monitoring service listens on', default='127.0.0.1', min_length=1
    )
    monitor_port: int = _env(
        'MONITOR_PORT', 'port the monitoring service listens on', default=8080, ge=1, le=65535
    )
    monitor_token: SecretStr | None = _env(
        'MONITOR_TOKEN',
        f'bearer token that POST .../cancel requires (at least {MIN_TOKEN_LENGTH} characters); '
        'unset: cancel is refused',
        default=None,
    )
    monitor_read_token: SecretStr | None = _env(
        'MONITOR_READ_TOKEN',
        'token every read but /healthz then requires, as a bearer token or the password of HTTP basic '
        f'auth (at least {MIN_TOKEN_LENGTH} characters; MONITOR_TOKEN is accepted too); '
        'unset: reads are open',
        default=None,
    )
    monitor_show_task_data: bool = _env(
        'MONITOR_SHOW_TASK_DATA',
        "show each task's result and error in the API (false: they are left out)",
        default=True,
    )

    # --- logging and paths ------------------------------------------------------------------
    log_level: Literal['DEBUG', 'INFO', 'WARNING', 'ERROR'] = _env(
        'LOG_LEVEL', 'worker log level', default='INFO'
    )
    log_format: Literal['plain', 'json'] = _env(
        'LOG_FORMAT', 'log lines as plain text or JSON', default='plain'
    )
    project_root: Path = _env(
        'PROJECT_ROOT',
        'directory flow modules are imported from (default: the working directory)',
        default_factory=Path.cwd,
    )

    @field_validator('log_level', mode='before')
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator('flow_modules', mode='before')
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(',') if m.strip()]
        return value

    @field_validator('redis_sentinels', mode='before')
    @classmethod
    def _split_sentinels(cls, value: object) -> object:
        return parse_sentinels(value) if isinstance(value, str) else value

    @field_validator('worker_id', mode='after')
    @classmethod
    def _default_worker_id(cls, value: str) -> str:
        return f'{socket.gethostname()}:{os.getpid()}' if value == '<hostname>:<pid>' else value

    @field_validator('database_url', 'redis_url', mode='after')
    @classmethod
    def _check_url(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # the form alone: SQLAlchemy and redis-py parse the rest when a command connects (and a
        # command that needs Redis alone does not load SQLAlchemy)
        problem = database_url_problem if info.field_name == 'database_url' else redis_url_problem
        if value is not None and (message := problem(value.get_secret_value())):
            raise ValueError(message)
        return value

    @field_validator('monitor_token', 'monitor_read_token', mode='after')
    @classmethod
    def _check_monitor_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f'must be at least {MIN_TOKEN_LENGTH} characters')
        return value

    @model_validator(mode='after')
    def _check_metrics_port(self) -> Settings:
        if self.metrics_port and self.metrics_serving_port > MAX_PORT:
            # the error names both settings, each as it was given (see _describe)
            raise PydanticCustomError(
                'settings_sum',
                'must be from 1 to {max} together (got {port} + {offset} = {total})',
                {
                    'fields': ('metrics_port', 'metrics_port_offset'),
                    'port': self.metrics_port,
                    'offset': self.metrics_port_offset,
                    'total': self.metrics_serving_port,
                    'max': MAX_PORT,
                },
            )
        return self

    @model_validator(mode='after')
    def _check_sentinels(self) -> Settings:
        if not self.redis_sentinels:
            return self
        # the errors name the settings, each as it was given (see _describe)
        if direct := tuple(f for f in ('redis_url', 'redis_host') if getattr(self, f)):
            raise PydanticCustomError(
                'settings_conflict',
                'only one may be set (with sentinels, they name the Redis to connect to)',
                {'fields': (*direct, 'redis_sentinels')},
            )
        if not self.redis_sentinel_master:
            raise PydanticCustomError(
                'settings_conflict',
                'must be set with REDIS_SENTINELS (the name the sentinels know the master by)',
                {'fields': ('redis_sentinel_master',)},
            )
        return self

    @property
    def metrics_serving_port(self) -> int:
        """The port this process serves its metrics on (0: none): the metrics port plus its offset."""
        return self.metrics_port + self.metrics_port_offset if self.metrics_port else 0

    def require_database(self) -> None:
        if self.database_url is None and not (
            self.database_host and self.database_name and self.database_user
        ):
            raise SettingsError(
                'DATABASE_URL is not set (nor DATABASE_HOST, DATABASE_NAME and DATABASE_USER)'
            )

    def require_redis(self) -> None:
        if self.redis_url is None and not self.redis_host and not self.redis_sentinels:
            raise SettingsError('REDIS_URL is not set (nor REDIS_HOST, nor REDIS_SENTINELS)')

    @property
    def queue_key(self) -> str:
        """The Redis sorted set that holds this worker's queue."""
        return QUEUE_KEY_PREFIX + self.queue_name

    def sqlalchemy_url(self) -> tuple[URL, dict[str, Any]]:
        """The asyncpg URL and the ``connect_args`` that carry TLS settings."""
        from sqlalchemy.engine import URL, make_url  # noqa: PLC0415  # see _check_database_url

        if self.database_url is not None:
            url = make_url(self.database_url.get_secret_value())
        else:
            url = URL.create(
                'postgresql',
                username=self.database_user,
                password=self.database_password.get_secret_value() if self.database_password else None,
                host=self.database_host,
                port=self.database_port,
                database=self.database_name,
            )
        query = dict(url.query)
        sslmode = self.database_sslmode or query.pop('sslmode', None)
        connect_args: dict[str, Any] = {}
        if isinstance(sslmode, str) and sslmode != 'disable':
            if self.database_sslrootcert is not None and sslmode in {'verify-ca', 'verify-full'}:
                context = ssl.create_default_context(cafile=self.database_sslrootcert)
                context.check_hostname = sslmode == 'verify-full'
                connect_args['ssl'] = context
            else:
                connect_args['ssl'] = sslmode
        return url.set(drivername='postgresql+asyncpg', query=query), connect_args

    def redis_settings(self) -> RedisSettings:
        """arq's settings for this Redis. With sentinels, what an arq producer gives arq for them:
        ``infrastructure.create_redis`` connects itself, with what arq leaves out (TLS to the master
        and the sentinels, the sentinels' own AUTH)."""
        if self.redis_sentinels:
            settings = RedisSettings(
                host=list(self.redis_sentinels),
                sentinel=True,
                sentinel_master=self.redis_sentinel_master or '',
                database=self.redis_db,
                username=self.redis_username,
                password=self.redis_password.get_secret_value() if self.redis_password else None,
            )
        elif self.redis_url is not None:
            settings = RedisSettings.from_dsn(self.redis_url.get_secret_value())
            # arq passes the URL's user and password on as written: decode them (a password with
            # @ : / % must be percent-encoded in a URL); redis://:password@host parses as user ''
            settings.username = unquote(settings.username) if settings.username else None
            settings.password = unquote(settings.password) if settings.password is not None else None
        else:
            settings = RedisSettings(
                host=self.redis_host or 'localhost',
                port=self.redis_port,
                database=self.redis_db,
                username=self.redis_username,
                password=self.redis_password.get_secret_value() if self.redis_password else None,
            )
        settings.ssl = settings.ssl or self.redis_tls
        if self.redis_tls_ca_certs is not None:
            settings.ssl_ca_certs = str(self.redis_tls_ca_certs)
        return settings


def env_name(field: str) -> str:
    """The environment variable a settings field is read from."""
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, AliasChoices)
    return str(alias.choices[0])


def load_settings(
    env_file: Path | None = None, *, options: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Settings from ``overrides`` (the command line), the environment, ``env_file`` and defaults.

    Raises :class:`SettingsError` with one line per bad or missing setting, naming the variable, or
    the option an override came from: ``options[field]``, else ``--field-name``.
    """
    if env_file is not None and not env_file.is_file():
        raise SettingsError(f'--env-file {env_file}: no such file')
    try:
        return Settings(_env_file=env_file or '.env', **overrides)
    except ValidationError as e:
        raise SettingsError(
            '; '.join(_describe(error, overrides, options or {}) for error in e.errors())
        ) from None


# errors of several settings at once (model validators), and how their names are joined
JOINED = {'settings_sum': ' + ', 'settings_conflict': ' and '}


def _describe(error: Any, overrides: dict[str, Any], options: Mapping[str, str]) -> str:
    message = str(error['msg']).removeprefix('Value error, ')
    if error['type'] in JOINED:
        named = JOINED[error['type']].join(_source(f, overrides, options) for f in error['ctx']['fields'])
        return f'{named}: {message}'
    if not error['loc']:
        return message
    field = str(error['loc'][0])
    if field not in Settings.model_fields:
        field = next((f for f in Settings.model_fields if env_name(f) == field), field)
    return f'{_source(field, overrides, options)}: {message}'


def _source(field: str, overrides: dict[str, Any], options: Mapping[str, str]) -> str:
    """Where ``field`` was given: its command-line option, else its environment variable."""
    if field in overrides:
        return options.get(field, '--' + field.replace('_', '-'))
    return env_name(field) if field in Settings.model_fields else field
