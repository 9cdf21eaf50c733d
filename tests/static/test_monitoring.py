"""monitoring/: the alert rules and the dashboard read only metrics that the monitoring service
and the worker processes export; the scrape configuration is Prometheus's."""

from __future__ import annotations

import json
import re

import yaml
from flowworker.metrics import WorkerMetrics
from flowworker.monitor import FleetMetrics

from ..conftest import ROOT

METRIC = re.compile(r'\bflowworker_[a-z_]+')
MONITORING = ROOT / 'monitoring'


# the series names of a metric family of each type (the _created ones are nobody's business)
SERIES = {
    'gauge': ('',),
    'counter': ('_total',),
    'histogram': ('_bucket', '_sum', '_count'),
    'info': ('_info',),
}


def exported() -> set[str]:
    worker = WorkerMetrics(
        'w:1', 'default', ['demo.echo'], 10, running=lambda: 0, waiting=lambda: 0, written=lambda: 0
    )
    families = [*FleetMetrics([], []).collect(), *worker.registry.collect()]
    return {family.name + suffix for family in families for suffix in SERIES[family.type]}


def read(queries: list[str]) -> set[str]:
    return {name for query in queries for name in METRIC.findall(query)}


def test_every_metric_an_alert_reads_is_one_the_fleet_exports() -> None:
    rules = yaml.safe_load((MONITORING / 'alerts.yml').read_text())
    names = read([rule['expr'] for group in rules['groups'] for rule in group['rules']])
    assert names
    assert names <= exported(), names - exported()


def test_every_panel_of_the_dashboard_queries_metrics_the_fleet_exports() -> None:
    dashboard = json.loads((MONITORING / 'dashboard.json').read_text())
    [source] = dashboard['__inputs']
    for panel in dashboard['panels']:
        assert panel['targets'], panel['title']
        assert panel['datasource']['uid'] == '${' + source['name'] + '}', panel['title']
        names = read([target['expr'] for target in panel['targets']])
        assert names, panel['title']
        assert names <= exported(), (panel['title'], names - exported())
    variables = read([variable['definition'] for variable in dashboard['templating']['list']])
    assert variables <= exported()
