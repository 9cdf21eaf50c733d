#!/usr/bin/python
"""What tasks/main.yml needs to know of the host, in one module run."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: flowworker_installed
short_description: Read the account, the tested virtualenv, the current version and the package lists
description:
  - Reads, and never changes, what the install steps of the role decide on; a converged host
    then skips the account, the virtualenv build and the switch of C(current).
  - Always runs, also in check mode.
options:
  user:
    description: The account the processes run as.
    type: str
    required: true
  group:
    description: Its primary group.
    type: str
    required: true
  home:
    description: The account's home directory.
    type: str
    required: true
  shell:
    description: The account's login shell.
    type: str
    required: true
  tested:
    description: The mark a version's virtualenv gets once it passed its smoke test.
    type: path
    required: true
  current:
    description: The link to the version that runs.
    type: path
    required: true
author: flowworker team
"""

RETURN = r"""
account:
  description: The user and group exist, the user with that primary group, home and shell.
  type: bool
  returned: always
tested:
  description: The tested mark exists.
  type: bool
  returned: always
current:
  description: Where C(current) points, as written in the link; null when it is no link.
  type: str
  returned: always
apt_lists:
  description: C(/var/lib/apt/lists) holds package lists (an image may have cleaned them).
  type: bool
  returned: always
"""

import glob
import grp
import os
import pwd

from ansible.module_utils.basic import AnsibleModule


def account_matches(user: str, group: str, home: str, shell: str) -> bool:
    try:
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return False
    return (entry.pw_gid, entry.pw_dir, entry.pw_shell) == (gid, home, shell)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            'user': {'type': 'str', 'required': True},
            'group': {'type': 'str', 'required': True},
            'home': {'type': 'str', 'required': True},
            'shell': {'type': 'str', 'required': True},
            'tested': {'type': 'path', 'required': True},
            'current': {'type': 'path', 'required': True},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        current = os.readlink(p['current'])
    except OSError:
        current = None
    module.exit_json(
        changed=False,
        account=account_matches(p['user'], p['group'], p['home'], p['shell']),
        tested=os.path.exists(p['tested']),
        current=current,
        apt_lists=bool(glob.glob('/var/lib/apt/lists/*_Packages*')),
    )


if __name__ == '__main__':
    main()
