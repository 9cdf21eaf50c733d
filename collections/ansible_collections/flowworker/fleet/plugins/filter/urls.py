"""The URLs the workers and the monitor connect with: flowworker's own check, and the quoting of their parts.

``{{ arq_monitor_redis_url | flowworker.fleet.redis_url_problem('arq_monitor_redis_url') }}`` is
``''`` for a good URL, otherwise what is wrong, after the variable's name: never the URL (it may
hold a password). ``{{ nodes | flowworker.fleet.redis_addresses_problem('redis_server_replication_nodes') }}``
does the same for a list of Redis or Sentinel addresses (``host:port``, ``[::1]:26379``), as
``REDIS_SENTINELS`` takes them; ``{{ groups['redis_sentinels'] | flowworker.fleet.addresses(hostvars,
26379) }}`` makes such a list of inventory hosts (their ``stack_address``, else their name).
``{{ password | flowworker.fleet.url_quote }}`` percent-encodes every character a URL's user or
password cannot hold as it is (``/`` too, which ``urlencode`` leaves). ``{{ 'worker' |
flowworker.fleet.redis_login(endpoint) }}`` is a Redis URL's ``user:password`` for that user of the
redis_server role's endpoint, or ``:password`` (Redis's default user) when the server has no users.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from ansible.errors import AnsibleFilterError
from ansible_collections.flowworker.fleet.plugins.plugin_utils.flowworker import urls


def _told(problem: str | None, name: str) -> str:
    return f'{name} {problem}'.strip() if problem else ''


def database_url_problem(url: Any, name: str = '') -> str:
    return _told(urls.database_url_problem(str(url or '')), name)


def redis_url_problem(url: Any, name: str = '') -> str:
    return _told(urls.redis_url_problem(str(url or '')), name)


def redis_addresses_problem(addresses: Any, name: str = '') -> str:
    entries = [str(entry) for entry in addresses or []]
    if any(',' in entry or not entry.strip() for entry in entries):
        return _told(
            'must be a list of host:port entries, one address each (got an empty one or a list in one)', name
        )
    try:
        urls.parse_sentinels(','.join(entries))
    except ValueError as error:
        return _told(str(error), name)
    return ''


def addresses(hosts: Any, hostvars: Any, port: Any) -> list[str]:
    """``host:port`` of each inventory host as the others reach it: its ``stack_address``, else its
    name (an IPv6 address in brackets)."""
    found = []
    for host in hosts or []:
        # hostvars' values are templated as they are read: ask for stack_address alone
        address = str(hostvars[host].get('stack_address', host))
        found.append(f'[{address}]:{port}' if ':' in address else f'{address}:{port}')
    return found


def env_quote(value: Any) -> str:
    """A value for an env file as python-dotenv reads it (flowworker's --env-file): single-quoted,
    so no ``#``, ``${...}``, space or quote in a password changes it."""
    escaped = str(value).replace('\\', '\\\\').replace("'", "\\'")
    return f"'{escaped}'"


def url_quote(value: Any) -> str:
    return quote(str(value), safe='')


def redis_login(user: Any, endpoint: dict[str, Any]) -> str:
    users: dict[str, str] = endpoint.get('users') or {}
    if not users:
        return f':{url_quote(endpoint.get("password") or "")}'
    if user not in users:
        has = ', '.join(sorted(users))
        raise AnsibleFilterError(
            f'the Redis server has no user {user!r} in redis_server_users (it has {has}): add it, '
            'or name another in stack_redis_worker_user / stack_redis_monitor_user'
        )
    return f'{url_quote(user)}:{url_quote(users[user])}'


class FilterModule:
    def filters(self) -> dict[str, Callable[..., str]]:
        return {
            'database_url_problem': database_url_problem,
            'redis_url_problem': redis_url_problem,
            'redis_addresses_problem': redis_addresses_problem,
            'addresses': addresses,
            'url_quote': url_quote,
            'env_quote': env_quote,
            'redis_login': redis_login,
        }
