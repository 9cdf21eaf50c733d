"""flowworker.urls: the one check of the URL forms, which the settings and the roles' validation share."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flowworker.urls import DATABASE_FORM, REDIS_FORM, database_url_problem, redis_url_problem

SECRET = 'hunter2-7f3a'

DATABASE = [
    ('postgresql://flow_worker:pw@db.internal:5432/flows?sslmode=verify-full', None),
    ('postgres://db/flows', None),
    ('postgresql+asyncpg://db/flows', None),
    ('postgresql:///flows?host=/run/postgresql', None),
    ('', 'got an empty one'),
    (f'mysql://u:{SECRET}@db/flows', "got scheme 'mysql'"),
    (f'u:{SECRET}@db/flows', 'got no scheme'),
    (f'postgresql://u:{SECRET}@db:5432', 'got one that names no database'),
    (f'postgresql://u:{SECRET}@db:5432/', 'got one that names no database'),
    (f'postgresql://u:{SECRET}@db:99999/flows', 'got a port that is not 1 to 65535'),
    (f'postgresql://u:{SECRET}@db:0/flows', 'got a port that is not 1 to 65535'),
]

REDIS = [
    ('redis://:pw@cache.internal:6379/0', None),
    ('redis://worker:pw@cache:6379', None),
    ('rediss://cache:6380/1', None),
    ('unix:///run/redis/redis.sock', None),
    ('', 'got an empty one'),
    (f'http://u:{SECRET}@cache', "got scheme 'http'"),
    (f':{SECRET}@cache:6379', 'got no scheme'),
    ('unix://', 'got a unix:// URL with no socket path'),
    (f'redis://:{SECRET}@:6379/0', 'got one that names no host'),
    (f'redis://:{SECRET}@cache/queue', 'got a database that is not a number'),
    (f'redis://:{SECRET}@cache:port/0', 'got a port that is not 1 to 65535'),
]


CASES = [(database_url_problem, DATABASE_FORM, *case) for case in DATABASE] + [
    (redis_url_problem, REDIS_FORM, *case) for case in REDIS
]


@pytest.mark.parametrize(('check', 'form', 'url', 'problem'), CASES, ids=[c[2] or 'empty' for c in CASES])
def test_each_form_and_what_is_wrong(
    check: Callable[[str], str | None], form: str, url: str, problem: str | None
) -> None:
    assert check(url) == (None if problem is None else f'must be {form} ({problem})')


@pytest.mark.parametrize('url', [url for url, problem in DATABASE + REDIS if problem])
def test_a_problem_never_shows_the_url(url: str) -> None:
    told = (database_url_problem(url) or '') + (redis_url_problem(url) or '')
    assert SECRET not in told
    assert told
