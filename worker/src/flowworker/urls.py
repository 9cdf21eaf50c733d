"""The URL forms flowworker connects with, checked without connecting.

One check for every reader: the settings (``DATABASE_URL``, ``REDIS_URL``, ``REDIS_SENTINELS``)
and the deployment roles, which load this file on the controller, before any host changes, so it
imports nothing beyond the standard library. A problem is told without the URL: it may hold a
password.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

DATABASE_FORM = 'a postgresql://user:password@host:port/name URL'
REDIS_FORM = 'a redis://[[user]:password@]host:port/db URL (rediss:// for TLS, or unix:///path)'
SENTINELS_FORM = (
    'comma-separated host:port entries, e.g. sentinel-1:26379,sentinel-2:26379 ([::1]:26379 for IPv6)'
)
MAX_PORT = 65535


def database_url_problem(url: str) -> str | None:
    """What is wrong with a PostgreSQL URL (``postgresql[+driver]://``), or None."""
    return _told(DATABASE_FORM, _database_got(url))


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL (``redis://``, ``rediss://``, ``unix://``), or None."""
    return _told(REDIS_FORM, _redis_got(url))


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """The (host, port) of each entry of a comma-separated ``host:port`` list, blank entries
    skipped; ValueError saying what is wrong with the first bad entry, by its number."""
    found = []
    for number, entry in enumerate(value.split(','), 1):
        if not entry.strip():
            continue
        address = _sentinel(entry.strip())
        if isinstance(address, str):
            raise ValueError(_told(SENTINELS_FORM, f'entry {number}, {address}'))
        found.append(address)
    return found


def _sentinel(entry: str) -> tuple[str, int] | str:
    """(host, port), or what is wrong with the entry (without it: a pasted URL may hold a password)."""
    if '@' in entry or '/' in entry:
        return 'a URL or a path'
    host, colon, port = entry.rpartition(':')
    if not colon:
        return 'one with no :port'
    if host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    elif ':' in host:
        return 'an IPv6 address without [brackets]'
    if not host or any(c.isspace() or c in '[]' for c in host):
        return 'one that names no host'
    if not (port.isascii() and port.isdigit() and 0 < int(port) <= MAX_PORT):
        return 'a port that is not 1 to 65535'
    return host, int(port)


def _told(form: str, got: str | None) -> str | None:
    return None if got is None else f'must be {form} (got {got})'


def _database_got(url: str) -> str | None:
    scheme, found, _ = url.partition('://')
    if not url:
        return 'an empty one'
    if not found or scheme.partition('+')[0] not in {'postgresql', 'postgres'}:
        return _scheme(scheme if found else '')
    parts = urlsplit(url)
    if not parts.path.strip('/'):
        return 'one that names no database'
    return _port(parts)


def _redis_got(url: str) -> str | None:
    scheme, found, _ = url.partition('://')
    if not url:
        return 'an empty one'
    if not found or scheme not in {'redis', 'rediss', 'unix'}:
        return _scheme(scheme if found else '')
    parts = urlsplit(url)
    if scheme == 'unix':
        return None if parts.path else 'a unix:// URL with no socket path'
    if not parts.hostname:
        return 'one that names no host'
    database = parts.path.strip('/')
    if database and not database.isdigit():
        return 'a database that is not a number'
    return _port(parts)


def _scheme(scheme: str) -> str:
    # a URL without '://' is told as having no scheme: what precedes a ':' may be a password
    return f'scheme {scheme!r}' if scheme and scheme.replace('+', '').isalnum() else 'no scheme'


def _port(parts: SplitResult) -> str | None:
    try:
        port = parts.port
    except ValueError:
        port = 0
    return None if port is None or port > 0 else 'a port that is not 1 to 65535'
