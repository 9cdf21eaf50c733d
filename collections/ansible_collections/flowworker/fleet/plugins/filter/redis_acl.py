"""The Redis ACL rules of flowworker's clients, for the redis_server role's users.

``{{ 'worker' | flowworker.fleet.redis_acl_rules }}`` is what ``flowworker.acl`` allows that
client (worker, monitor or admin), as a ``user`` line of redis.conf takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.flowworker.fleet.plugins.plugin_utils.flowworker import acl


def redis_acl_rules(role: Any) -> str:
    try:
        return str(acl.acl_rules(str(role)))
    except ValueError as error:
        raise AnsibleFilterError(f'redis_server_users: acl {error}') from None


class FilterModule:
    def filters(self) -> dict[str, Callable[..., str]]:
        return {'redis_acl_rules': redis_acl_rules}
