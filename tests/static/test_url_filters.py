"""flowworker.fleet's URL filters (arq_monitor's validation): flowworker's check, after the variable."""

from __future__ import annotations

import sys

from ..conftest import ROOT

sys.path.insert(0, str(ROOT / 'collections'))

from ansible_collections.flowworker.fleet.plugins.filter.urls import FilterModule

FILTERS = FilterModule().filters()


def test_a_good_url_has_no_problem() -> None:
    assert FILTERS['database_url_problem']('postgresql://u:pw@db/flows', 'arq_monitor_database_url') == ''
    assert FILTERS['redis_url_problem']('rediss://:pw@cache:6380/0', 'arq_monitor_redis_url') == ''


def test_a_problem_names_the_variable_and_never_the_url() -> None:
    told = FILTERS['redis_url_problem']('http://:hunter2@cache', 'arq_monitor_redis_url')
    assert told == (
        'arq_monitor_redis_url must be a redis://[[user]:password@]host:port/db URL '
        "(rediss:// for TLS, or unix:///path) (got scheme 'http')"
    )
    assert FILTERS['database_url_problem'](None) == (
        'must be a postgresql://user:password@host:port/name URL (got an empty one)'
    )
