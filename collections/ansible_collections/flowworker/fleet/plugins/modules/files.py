#!/usr/bin/python
"""Bring a list of files, directories and links to their wanted state in one module run."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: files
short_description: Converge many files, directories and links in one round trip
description:
  - Brings each entry of I(files) to its state, in order, in a single run on the host, so a role's
    configuration costs one task instead of one template, copy or file task per path (each of
    those is two module runs when nothing changes).
  - A file is written only when its content, owner, group or mode differ. The new content goes
    to a temporary file in the same directory, created with the final owner, group and mode,
    checked with I(validate), then renamed over the old one; a reader never sees a partial or
    unvalidated file, nor a secret with looser permissions.
  - Check mode reports what would change and changes nothing; C(--diff) shows each changed
    path, with its content unless the entry is I(secret).
  - The action plugin of the same name renders templates and reads the role's files on the
    controller; this module receives their content.
options:
  files:
    description: The entries, converged in this order.
    type: list
    elements: dict
    required: true
    suboptions:
      path:
        description: The path on the host.
        type: path
        required: true
      state:
        description:
          - C(file) with I(content); C(directory) (parents made too); C(link) to I(target);
            C(absent) removes a file, link or tree.
        type: str
        choices: [file, directory, link, absent]
        default: file
      content:
        description: The file's content (state C(file)).
        type: str
      target:
        description: What the link points to (state C(link)).
        type: str
      owner:
        description: Owner of the file or directory; unset keeps the current one (root for a new one).
        type: str
      group:
        description: Group of the file or directory; unset keeps the current one (root for a new one).
        type: str
      mode:
        description: Octal mode, a string such as C('0640'); required for C(file) and C(directory).
        type: str
      validate:
        description: A command with C(%s) run on the candidate file before it replaces the old one.
        type: str
      unit:
        description:
          - Check the candidate with C(systemd-analyze verify) as the systemd unit its path names
            (its basename) before it replaces the old one; a template unit (C(name@.service)) as
            its instance 1, so that C(ExecStart)'s program and the specifiers are checked too.
        type: bool
        default: false
      secret:
        description: Keep the content out of every output, the diff included.
        type: bool
        default: false
author: flowworker team
"""

EXAMPLES = r"""
- name: Write redis.conf and its password file
  flowworker.fleet.files:
    files:
      - path: /etc/redis/redis-auth.conf
        template: etc/redis/redis-auth.conf.j2
        owner: redis
        group: redis
        mode: '0640'
        secret: true
      - path: /etc/redis/redis.conf
        template: etc/redis/redis.conf.j2
        owner: redis
        group: redis
        mode: '0640'
        validate: /usr/local/sbin/redis-server-check-config %s
"""

RETURN = r"""
changed_paths:
  description: The paths this run changed (or would change in check mode), in order.
  returned: always
  type: list
  elements: str
"""

import grp
import os
import pwd
import shlex
import shutil
import stat
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule

MAX_DIFF_BYTES = 65536
# uid, gid and mode (None: left as it is)
Wanted = tuple[int, int, int | None]
# in check mode, the id of a user or group that an earlier task of the run would create
UNKNOWN = -2


class EntryError(Exception):
    pass


def _lstat(path: str) -> os.stat_result | None:
    """The path's own status (a link's, not its target's); None when nothing is there."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _mode(mode: str | None) -> int | None:
    if mode is None:
        return None
    if not (isinstance(mode, str) and mode.isdigit() and set(mode) <= set('01234567') and len(mode) <= 5):
        raise EntryError(f"mode must be an octal string such as '0644', got {mode!r}")
    return int(mode, 8)


def _attributes(st: os.stat_result | None) -> dict[str, Any]:
    if st is None:
        return {}
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return {'owner': owner, 'group': group, 'mode': f'{stat.S_IMODE(st.st_mode):04o}'}


def _describe(kind: str, attributes: dict[str, Any]) -> str:
    if kind == 'absent':
        return 'absent\n'
    return f'{kind} ' + ' '.join(f'{key}={value}' for key, value in attributes.items()) + '\n'


class Converger:
    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.check = module.check_mode
        self.changed_paths: list[str] = []
        self.diffs: list[dict[str, str]] = []

    def _changed(self, path: str, diff: dict[str, str]) -> None:
        self.changed_paths.append(path)
        if self.module._diff:
            self.diffs.append({'before_header': path, 'after_header': path, **diff})

    def _id(self, kind: str, name: str | None) -> int:
        """The uid of an owner or the gid of a group named on this host; -1 (left as it is) for None.

        In check mode a name not on the host yet (an earlier task of the run would create it) is
        UNKNOWN, which differs from every id: a change, not an error.
        """
        if name is None:
            return -1
        try:
            return pwd.getpwnam(name).pw_uid if kind == 'owner' else grp.getgrnam(name).gr_gid
        except KeyError:
            if self.check:
                return UNKNOWN
            raise EntryError(
                f'{kind} {name!r} is not a {"user" if kind == "owner" else "group"} on this host'
            ) from None

    def _wanted_of(self, entry: dict[str, Any], st: os.stat_result | None) -> Wanted:
        """Owner and group default to the current ones, then to root (the module's user)."""
        uid, gid = self._id('owner', entry['owner']), self._id('group', entry['group'])
        if uid == -1:
            uid = st.st_uid if st else os.getuid()
        if gid == -1:
            gid = st.st_gid if st else os.getgid()
        return uid, gid, _mode(entry['mode'])

    @staticmethod
    def _after(entry: dict[str, Any], wanted: Wanted) -> dict[str, Any]:
        """The attributes the entry gets, by name."""
        return {
            'owner': entry['owner'] or pwd.getpwuid(wanted[0]).pw_name,
            'group': entry['group'] or grp.getgrgid(wanted[1]).gr_name,
            'mode': entry['mode'],
        }

    def _set_attributes(self, path: str, uid: int, gid: int, mode: int | None) -> None:
        os.lchown(path, uid, gid)
        if mode is not None:
            os.chmod(path, mode)

    def _attributes_differ(self, st: os.stat_result, uid: int, gid: int, mode: int | None) -> bool:
        return st.st_uid != uid or st.st_gid != gid or (mode is not None and stat.S_IMODE(st.st_mode) != mode)

    def file(self, entry: dict[str, Any]) -> None:
        path = entry['path']
        if entry['content'] is None:
            raise EntryError('state file needs content (or template or src in the task)')
        if entry['mode'] is None:
            raise EntryError('state file needs a mode')
        data = entry['content'].encode('utf-8', 'surrogateescape')
        st = _lstat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise EntryError('is a directory, not a file')
        old = b''
        if st is not None and stat.S_ISREG(st.st_mode):
            with open(path, 'rb') as current:
                old = current.read()
        wanted = self._wanted_of(entry, st)
        content_differs = st is None or not stat.S_ISREG(st.st_mode) or old != data
        if not content_differs and not self._attributes_differ(st, *wanted):  # type: ignore[arg-type]
            return
        self._changed(path, self._file_diff(entry, st, old, wanted, content_differs))
        if self.check:
            return
        if content_differs:
            self._replace(path, data, wanted, entry)
        else:
            self._set_attributes(path, *wanted)

    @staticmethod
    def _file_diff(
        entry: dict[str, Any], st: os.stat_result | None, old: bytes, wanted: Wanted, content_differs: bool
    ) -> dict[str, str]:
        """Content when it changed and may be shown; else the attributes, and whether the content changed."""
        if content_differs and not entry['secret'] and max(len(old), len(entry['content'])) <= MAX_DIFF_BYTES:
            return {'before': old.decode('utf-8', 'replace'), 'after': entry['content']}
        after = Converger._after(entry, wanted)
        return {
            'before': _describe('file' if st else 'absent', _attributes(st)),
            'after': _describe('file', after) + ('(content changed, not shown)\n' if content_differs else ''),
        }

    def _replace(self, path: str, data: bytes, wanted: Wanted, entry: dict[str, Any]) -> None:
        """A candidate beside the file, with its final attributes, validated, renamed over it."""
        directory = os.path.dirname(path) or '.'
        if not os.path.isdir(directory):
            raise EntryError(f'its directory {directory} does not exist')
        fd, candidate = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.')
        try:
            with os.fdopen(fd, 'wb') as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self._set_attributes(candidate, *wanted)
            if entry['validate']:
                self._validate(entry['validate'], candidate)
            if entry['unit']:
                self._verify_unit(candidate, os.path.basename(path))
            os.replace(candidate, path)
        except BaseException:
            if os.path.lexists(candidate):
                os.unlink(candidate)
            raise

    def _validate(self, command: str, candidate: str) -> None:
        if '%s' not in command:
            raise EntryError(f'validate must contain %s, got {command!r}')
        rc, out, err = self.module.run_command(shlex.split(command.replace('%s', shlex.quote(candidate))))
        if rc != 0:
            raise EntryError(f'failed validation with {command!r} (rc {rc}): {(err or out).strip()}')

    def _verify_unit(self, candidate: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as directory:
            shutil.copyfile(candidate, os.path.join(directory, name))
            checked = os.path.join(directory, name.replace('@.', '@1.', 1))
            rc, out, err = self.module.run_command(['systemd-analyze', 'verify', checked])
        if rc != 0:
            raise EntryError(f'failed systemd-analyze verify as {name} (rc {rc}): {(err or out).strip()}')

    def directory(self, entry: dict[str, Any]) -> None:
        path = entry['path']
        if entry['mode'] is None:
            raise EntryError('state directory needs a mode')
        st = _lstat(path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise EntryError('exists and is not a directory')
        uid, gid, mode = wanted = self._wanted_of(entry, st)
        if st is not None and not self._attributes_differ(st, uid, gid, mode):
            return
        after_attrs = self._after(entry, wanted)
        self._changed(
            path,
            {
                'before': _describe('directory' if st else 'absent', _attributes(st)),
                'after': _describe('directory', after_attrs),
            },
        )
        if self.check:
            return
        if st is None:
            os.makedirs(path)
        self._set_attributes(path, uid, gid, mode)

    def link(self, entry: dict[str, Any]) -> None:
        path, target = entry['path'], entry['target']
        if not target:
            raise EntryError('state link needs a target')
        st = _lstat(path)
        if st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(path) == target:
            return
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise EntryError('is a directory, not a link')
        before = (
            f'link to {os.readlink(path)}\n'
            if st is not None and stat.S_ISLNK(st.st_mode)
            else _describe('file' if st else 'absent', _attributes(st))
        )
        self._changed(path, {'before': before, 'after': f'link to {target}\n'})
        if self.check:
            return
        candidate = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.{os.getpid()}.link')
        if os.path.lexists(candidate):
            os.unlink(candidate)
        os.symlink(target, candidate)
        os.replace(candidate, path)

    def absent(self, entry: dict[str, Any]) -> None:
        path = entry['path']
        st = _lstat(path)
        if st is None:
            return
        kind = 'directory' if stat.S_ISDIR(st.st_mode) else 'link' if stat.S_ISLNK(st.st_mode) else 'file'
        self._changed(path, {'before': _describe(kind, _attributes(st)), 'after': 'absent\n'})
        if self.check:
            return
        if kind == 'directory':
            shutil.rmtree(path)
        else:
            os.unlink(path)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            'files': {
                'type': 'list',
                'elements': 'dict',
                'required': True,
                'options': {
                    'path': {'type': 'path', 'required': True},
                    'state': {
                        'type': 'str',
                        'choices': ['file', 'directory', 'link', 'absent'],
                        'default': 'file',
                    },
                    'content': {'type': 'str'},
                    'target': {'type': 'str'},
                    'owner': {'type': 'str'},
                    'group': {'type': 'str'},
                    'mode': {'type': 'str'},
                    'validate': {'type': 'str'},
                    'unit': {'type': 'bool', 'default': False},
                    'secret': {'type': 'bool', 'default': False},
                },
            }
        },
        supports_check_mode=True,
    )
    entries = module.params['files']
    for entry in entries:
        if entry['secret'] and entry['content']:
            module.no_log_values.add(entry['content'])
    converger = Converger(module)
    for entry in entries:
        try:
            getattr(converger, entry['state'])(entry)
        except (EntryError, OSError) as error:
            module.fail_json(
                msg=f'{entry["path"]}: {error}',
                changed=bool(converger.changed_paths),
                changed_paths=converger.changed_paths,
            )
    result: dict[str, Any] = {
        'changed': bool(converger.changed_paths),
        'changed_paths': converger.changed_paths,
    }
    if module._diff:
        result['diff'] = converger.diffs
    module.exit_json(**result)


if __name__ == '__main__':
    main()
