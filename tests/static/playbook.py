"""Run tasks of the project's plugins with ansible-playbook on this machine (connection local)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..conftest import ROOT

ANSIBLE_PLAYBOOK = (
    'ansible-playbook',
    '-i',
    'localhost,',
    '-c',
    'local',
    '-e',
    f'ansible_python_interpreter={sys.executable}',
)


def run_tasks(
    tmp_path: Path, tasks: list[dict[str, Any]], flags: tuple[str, ...] = ()
) -> tuple[list[dict[str, Any]], str]:
    """One play of these tasks, each registered and its errors ignored: their results, and all
    that ansible-playbook printed."""
    playbook = tmp_path / 'play.yml'
    steps: list[dict[str, Any]] = [
        {**task, 'register': f'result{i}', 'ignore_errors': True} for i, task in enumerate(tasks)
    ]
    results = '[' + ', '.join(f'result{i}' for i in range(len(tasks))) + ']'
    steps.append(
        {
            'ansible.builtin.copy': {
                'content': '{{ ' + results + ' | to_json }}',
                'dest': str(tmp_path / 'result.json'),
            },
            'check_mode': False,
        }
    )
    playbook.write_text(json.dumps([{'hosts': 'localhost', 'gather_facts': False, 'tasks': steps}]))
    proc = subprocess.run(
        [*ANSIBLE_PLAYBOOK, str(playbook), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, 'ANSIBLE_CONFIG': str(ROOT / 'ansible.cfg'), 'ANSIBLE_NOCOLOR': '1'},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / 'result.json').read_text())
    (tmp_path / 'result.json').unlink()
    return result, proc.stdout + proc.stderr
