#!/usr/bin/python
"""The documentation of the report_change action plugin, which runs on the controller alone."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: report_change
short_description: Report on this host a change another task made for it
description:
  - A task that converges the files of many hosts in one run (C(run_once), delegated to the host
    that holds them) reports its change on the one host it ran for. This task, run on every
    host, reports each change on the host it was made for, with its diff under C(--diff).
  - Runs on the controller, changes nothing, and works in check mode.
options:
  changed:
    description: Whether this host's part changed (or would change, in check mode).
    type: bool
    default: false
  diff:
    description:
      - The diffs of this host's part, as the converging task returned them (C(before),
        C(after), and their headers).
    type: list
    elements: dict
    default: []
author: flowworker team
"""

EXAMPLES = r"""
- name: Report the change on each host whose scrape targets changed
  flowworker.fleet.report_change:
    changed: "{{ inventory_hostname ~ '.json' in written.changed_paths | map('basename') }}"
"""
