"""Render each entry's template (or read its file) on the controller; converge them in one module run.

An entry may name ``template`` (a file of the role's ``templates/``, rendered with the task's
variables and the entry's ``vars``) or ``src`` (a file of the role's ``files/``, sent as it is)
instead of ``content``. The module (plugins/modules/files.py) does the rest on the host.
"""

from __future__ import annotations

import os
from typing import Any

from ansible import constants as C
from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.plugins.action import ActionBase
from ansible.template import trust_as_template

SOURCES = ('template', 'src', 'content')


class ActionModule(ActionBase):
    TRANSFERS_FILES = False

    def _render(self, source: str, extra_vars: dict[str, Any], task_vars: dict[str, Any]) -> str:
        path = self._find_needle('templates', source)
        searchpath = [os.path.dirname(path)]
        for base in [*task_vars.get('ansible_search_path', []), self._loader.get_basedir()]:
            searchpath += [os.path.join(base, 'templates'), base]
        # the template module's ansible_managed, unless the inventory sets its own
        variables = {'ansible_managed': C.DEFAULT_MANAGED_STR, **task_vars, **extra_vars}
        templar = self._templar.copy_with_new_env(searchpath=searchpath, available_variables=variables)
        rendered = templar.template(
            trust_as_template(self._loader.get_text_file_contents(path)), escape_backslashes=False
        )
        return '' if rendered is None else str(rendered)

    def _entry(self, index: int, entry: Any, task_vars: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(entry, dict) or 'path' not in entry:
            # the keys only: an entry's content may be a secret
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise AnsibleActionFail(f'files[{index}] must be a mapping with a path, got {keys}')
        sources = [key for key in SOURCES if key in entry]
        if len(sources) > 1:
            given = ' and '.join(sources)
            raise AnsibleActionFail(
                f'files[{index}] ({entry["path"]}): give one of {", ".join(SOURCES)}, not {given}'
            )
        module_entry = {key: value for key, value in entry.items() if key not in ('template', 'src', 'vars')}
        try:
            if entry.get('state') == 'absent':
                # nothing to write: a path that goes is named with its source, never rendered
                module_entry.pop('content', None)
            elif 'template' in entry:
                module_entry['content'] = self._render(entry['template'], entry.get('vars') or {}, task_vars)
            elif 'src' in entry:
                module_entry['content'] = self._loader.get_text_file_contents(
                    self._find_needle('files', entry['src'])
                )
        except AnsibleError as error:
            raise AnsibleActionFail(f'files[{index}] ({entry["path"]}): {error}') from error
        return module_entry

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        entries = self._task.args.get('files')
        if not isinstance(entries, list):
            raise AnsibleActionFail(f'files must be a list of entries, got {type(entries).__name__}')
        module_args = {'files': [self._entry(index, entry, task_vars) for index, entry in enumerate(entries)]}
        result.update(
            self._execute_module(
                module_name='flowworker.fleet.files', module_args=module_args, task_vars=task_vars
            )
        )
        return result
