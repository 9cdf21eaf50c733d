"""What a server role publishes to its clients, as that role sees it on one of its hosts."""

from __future__ import annotations

from collections import ChainMap
from typing import Any

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase
from ansible_collections.flowworker.fleet.plugins.plugin_utils.flowworker import ROLES

DOCUMENTATION = r"""
---
name: endpoint
short_description: A server role's published endpoint, for one of its hosts
description:
  - Returns the variable C(<role>_endpoint) of the role's C(vars/main.yml) (its port, TLS, CA
    file, database, role names and passwords, all a client needs), templated as the role would
    template it on O(host) - that host's inventory variables first, the role's
    C(defaults/main.yml) where the inventory sets nothing.
  - It reads the inventory, not facts, so it works for a server host that a C(--limit)ed run leaves
    out, and no role default is typed again where a client's URL is assembled.
options:
  _terms:
    description: The role's name (a role of this project's C(roles/)).
    required: true
  host:
    description: The inventory name of the role's host.
    type: str
    required: true
"""

EXAMPLES = r"""
stack_redis: "{{ lookup('flowworker.fleet.endpoint', 'redis_server', host=groups['redis_servers'] | first) }}"
"""

RETURN = r"""
_raw:
  description: The role's endpoint, a mapping.
  type: list
  elements: dict
"""


class LookupModule(LookupBase):
    def _role_file(self, role: str, name: str) -> dict[str, Any]:
        path = ROLES / role / name / 'main.yml'
        data = self._loader.load_from_file(str(path), trusted_as_template=True) if path.is_file() else None
        return data if isinstance(data, dict) else {}

    def run(self, terms: list[Any], variables: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
        self.set_options(var_options=variables, direct=kwargs)
        host = self.get_option('host')
        hostvars = (variables or {}).get('hostvars', {})
        if host not in hostvars:
            raise AnsibleLookupError(f'flowworker.fleet.endpoint: {host!r} is no host of this inventory')
        published = []
        for role in terms:
            role_vars = self._role_file(str(role), 'vars')
            name = f'{role}_endpoint'
            if name not in role_vars:
                raise AnsibleLookupError(
                    f'flowworker.fleet.endpoint: the role {role!r} publishes no {name} '
                    f'(in {ROLES / str(role)}/vars/main.yml)'
                )
            # Ansible's order: the role's vars, then the host's own (its inventory, as written: only
            # what the endpoint reads gets templated, so a variable that needs facts the run does
            # not have costs nothing), then the role's defaults
            context = ChainMap(role_vars, hostvars.raw_get(host), self._role_file(str(role), 'defaults'))
            published.append(
                self._templar.copy_with_new_env(available_variables=context).template(role_vars[name])
            )
        return published
