"""Report on this host the change another task made for it, with that change's diff.

A task that writes the files of many hosts in one run (``run_once``) reports its change on the
host it ran for; this puts each change back on the host whose file it was. It runs on the
controller alone and changes nothing. The module of the same name holds the documentation.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        changed = boolean(self._task.args.get('changed', False), strict=False)
        diff = self._task.args.get('diff') or []
        if not isinstance(diff, list):
            raise AnsibleActionFail(f'diff must be a list of diffs, got {type(diff).__name__}')
        result['changed'] = changed
        if changed and diff:
            result['diff'] = diff
        return result
