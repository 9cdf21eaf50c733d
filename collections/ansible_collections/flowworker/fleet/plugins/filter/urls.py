"""The URLs the workers and the monitor connect with: flowworker's own check, and the quoting of their parts.

``{{ arq_monitor_redis_url | flowworker.fleet.redis_url_problem('arq_monitor_redis_url') }}`` is
``''`` for a good URL, otherwise what is wrong, after the variable's name: never the URL (it may
hold a password). ``{{ password | flowworker.fleet.url_quote }}`` percent-encodes every character
a URL's user or password cannot hold as it is (``/`` too, which ``urlencode`` leaves).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from ansible_collections.flowworker.fleet.plugins.plugin_utils.flowworker import urls


def _told(problem: str | None, name: str) -> str:
    return f'{name} {problem}'.strip() if problem else ''


def database_url_problem(url: Any, name: str = '') -> str:
    return _told(urls.database_url_problem(str(url or '')), name)


def redis_url_problem(url: Any, name: str = '') -> str:
    return _told(urls.redis_url_problem(str(url or '')), name)


def url_quote(value: Any) -> str:
    return quote(str(value), safe='')


class FilterModule:
    def filters(self) -> dict[str, Callable[..., str]]:
        return {
            'database_url_problem': database_url_problem,
            'redis_url_problem': redis_url_problem,
            'url_quote': url_quote,
        }
