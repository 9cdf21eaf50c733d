"""monitoring/: the alert rules read only metrics that the monitoring service exports."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import yaml
from flowworker import fleet
from flowworker.monitor import FleetMetrics

from ..conftest import ROOT

METRIC = re.compile(r'\bflowworker_[a-z_]+')


def test_every_metric_an_alert_reads_is_one_the_monitor_exports() -> None:
    rules = yaml.safe_load((ROOT / 'monitoring' / 'alerts.yml').read_text())
    exprs = [rule['expr'] for group in rules['groups'] for rule in group['rules']]
    read = {name for expr in exprs for name in METRIC.findall(expr)}
    nothing = fleet.Fleet(at=datetime.now(UTC), workers=[], queues=[], rates=[], flows=[])
    exported = {family.name for family in FleetMetrics(nothing).collect()}
    assert read
    assert read <= exported, read - exported
