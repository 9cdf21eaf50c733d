"""flowworker.fleet.files, run by ansible-playbook on this machine (connection local) in a temporary dir."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from .playbook import run_tasks

SECRET = 'PASSWORD=not-to-be-printed-7f3a'


def run(
    tmp_path: Path, *tasks: list[dict[str, Any]], flags: tuple[str, ...] = ()
) -> tuple[list[dict[str, Any]], str]:
    """One play, a files task per list of entries: their results, and all that ansible-playbook printed."""
    templates = tmp_path / 'templates'
    templates.mkdir(exist_ok=True)
    (templates / 'greeting.j2').write_text('# {{ ansible_managed }}\nhello {{ who }}\n')
    return run_tasks(tmp_path, [{'flowworker.fleet.files': {'files': files}} for files in tasks], flags)


def entries(root: Path) -> list[dict[str, Any]]:
    return [
        {'path': str(root), 'state': 'directory', 'mode': '0750'},
        {
            'path': str(root / 'greeting.conf'),
            'template': 'greeting.j2',
            'vars': {'who': 'fleet'},
            'mode': '0644',
        },
        {'path': str(root / 'app.env'), 'content': SECRET + '\n', 'mode': '0600', 'secret': True},
        {'path': str(root / 'current'), 'state': 'link', 'target': 'greeting.conf'},
        # a path that goes is not rendered: its template may need what only a host that keeps it has
        {'path': str(root / 'old.conf'), 'state': 'absent', 'template': 'no-such-template.j2'},
    ]


def test_converges_in_one_run_and_a_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / 'etc'
    (tmp_path / 'etc').mkdir()
    (root / 'old.conf').write_text('left from an earlier release\n')
    [result, again], _ = run(tmp_path, entries(root), entries(root))
    assert result['changed'] is True
    assert result['changed_paths'] == [
        str(root),
        *(str(root / name) for name in ('greeting.conf', 'app.env', 'current', 'old.conf')),
    ]
    assert (root / 'greeting.conf').read_text() == '# Ansible managed\nhello fleet\n'
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    assert stat.S_IMODE((root / 'app.env').stat().st_mode) == 0o600
    assert os.readlink(root / 'current') == 'greeting.conf'
    assert not (root / 'old.conf').exists()
    assert again['changed'] is False
    assert again['changed_paths'] == []


def test_check_mode_reports_and_writes_nothing_and_the_diff_names_each_path(tmp_path: Path) -> None:
    root = tmp_path / 'etc'
    root.mkdir()
    (root / 'greeting.conf').write_text('hello world\n')
    # a group an earlier task of the run would create is a change in check mode, not an error
    later = {
        'path': str(root / 'later.conf'),
        'content': 'x\n',
        'mode': '0640',
        'group': 'made-by-an-earlier-task',
    }
    [result], output = run(tmp_path, [*entries(root), later], flags=('--check', '--diff'))
    assert result['changed'] is True
    assert result.get('failed') is not True
    assert str(root / 'later.conf') in result['changed_paths']
    assert (root / 'greeting.conf').read_text() == 'hello world\n'
    assert not (root / 'app.env').exists()
    assert not (root / 'current').exists()
    assert f'+++ after: {root / "greeting.conf"}' in output
    assert '-hello world' in output
    assert '+hello fleet' in output


def test_a_secret_is_never_printed_not_even_with_diff_and_vvv(tmp_path: Path) -> None:
    root = tmp_path / 'etc'
    root.mkdir()
    # and an entry refused for a missing path is named by its keys, never its content
    pathless = {'content': SECRET, 'mode': '0600', 'secret': True}
    [result, refused], output = run(tmp_path, entries(root)[2:3], [pathless], flags=('--diff', '-vvv'))
    assert result['changed'] is True
    assert refused['failed'] is True
    assert "must be a mapping with a path, got ['content', 'mode', 'secret']" in refused['msg']
    assert SECRET not in output
    assert '(content changed, not shown)' in output
    assert (root / 'app.env').read_text() == SECRET + '\n'


def test_a_candidate_that_fails_validation_or_the_unit_check_is_not_written(tmp_path: Path) -> None:
    root = tmp_path / 'etc'
    root.mkdir()
    (root / 'app.conf').write_text('good\n')
    bad = {'path': str(root / 'app.conf'), 'content': 'bad\n', 'mode': '0644', 'validate': 'grep -q good %s'}
    # a unit is checked as the unit its path names; a template as its instance 1
    template = {'path': str(root / 'app@.service'), 'content': '[Service]\nExecStart=/bin/sleep %i\n'}
    broken = {'path': str(root / 'app.service'), 'content': '[Service]\nExecStart=/nonexistent/app\n'}
    units = [{**entry, 'mode': '0644', 'unit': True} for entry in (template, broken)]
    [result, unit_result], _ = run(tmp_path, [bad], units)
    assert result['failed'] is True
    assert 'failed validation' in result['msg']
    assert str(root / 'app.conf') in result['msg']
    assert (root / 'app.conf').read_text() == 'good\n'
    assert unit_result['failed'] is True
    assert f'{root}/app.service: failed systemd-analyze verify as app.service' in unit_result['msg']
    assert '/nonexistent/app' in unit_result['msg']
    assert sorted(p.name for p in root.iterdir()) == ['app.conf', 'app@.service']


BAD_ENTRIES = [
    ({'state': 'file', 'content': 'x'}, 'state file needs a mode'),
    ({'state': 'file', 'content': 'x', 'mode': 'rw-r--r--'}, "mode must be an octal string such as '0644'"),
    (
        {'state': 'file', 'content': 'x', 'mode': '0644', 'owner': 'no-such-user-here'},
        "owner 'no-such-user-here' is not a user",
    ),
    ({'state': 'link'}, 'state link needs a target'),
    ({'state': 'file', 'content': 'x', 'mode': '0644', 'validate': 'true'}, 'validate must contain %s'),
    (
        {'content': 'x', 'template': 'greeting.j2', 'mode': '0644'},
        'give one of template, src, content, not template and content',
    ),
]


def test_bad_entries_fail_naming_the_path_and_the_rule_and_write_nothing(tmp_path: Path) -> None:
    paths = [tmp_path / f'target{i}.conf' for i in range(len(BAD_ENTRIES))]
    results, _ = run(
        tmp_path,
        *([{'path': str(path), **entry}] for path, (entry, _) in zip(paths, BAD_ENTRIES, strict=True)),
    )
    for path, (_, message), result in zip(paths, BAD_ENTRIES, results, strict=True):
        assert result['failed'] is True
        assert message in result['msg']
        assert str(path) in result['msg']
        assert not path.exists()
