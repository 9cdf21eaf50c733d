"""monitoring/: the alert rules and the dashboard read only metrics that the monitoring service exports."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import yaml
from flowworker import fleet
from flowworker.monitor import FleetMetrics

from ..conftest import ROOT

METRIC = re.compile(r'\bflowworker_[a-z_]+')
MONITORING = ROOT / 'monitoring'


def exported() -> set[str]:
    nothing = fleet.Fleet(at=datetime.now(UTC), workers=[], queues=[], rates=[], flows=[])
    return {family.name for family in FleetMetrics(nothing).collect()}


def read(queries: list[str]) -> set[str]:
    return {name for query in queries for name in METRIC.findall(query)}


def test_every_metric_an_alert_reads_is_one_the_monitor_exports() -> None:
    rules = yaml.safe_load((MONITORING / 'alerts.yml').read_text())
    names = read([rule['expr'] for group in rules['groups'] for rule in group['rules']])
    assert names
    assert names <= exported(), names - exported()


def test_every_panel_of_the_dashboard_queries_metrics_the_monitor_exports() -> None:
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
