"""After check mode on a host the role never provisioned (molecule's `check` step: pypi and
systemd; side_effect_check_supervisor.yml: wheelhouse and supervisor): nothing changed.
prepare.yml touched MARKER as its last step.
"""

from __future__ import annotations

MARKER = '/run/pypi-test-before-check'
# Where the role writes: files, the user and group in /etc, Debian packages. The journal and
# the logs of the host's Redis and PostgreSQL change on their own, sshd records each of
# Ansible's logins (lastlog, wtmp); apt logs its planner's answer even for a simulated install
# (check mode; a real install shows in /var/lib/dpkg).
WATCHED = '/etc /opt /srv /usr /var/lib/dpkg /var/lib/apt /var/log'
NOT_OURS = (
    '/var/log/journal',
    '/var/log/postgresql',
    '/var/log/redis',
    '/var/log/apt',
    '/var/log/lastlog',
    '/var/log/wtmp',
)


def test_no_file_was_written(host):
    assert host.file(MARKER).exists
    prune = ' -o '.join(f'-path {path}' for path in NOT_OURS)
    newer = host.check_output(f'find {WATCHED} -xdev \\( {prune} \\) -prune -o -newer {MARKER} -print')
    assert newer == ''


def test_no_user_no_units_no_processes(host):
    assert not host.user('arq-worker').exists
    assert not host.group('arq-worker').exists
    assert host.check_output("systemctl list-units --all --plain --no-legend 'arq-worker*'") == ''
    for unit in ('arq-worker@.service', 'arq-worker.target'):
        assert not host.file(f'/etc/systemd/system/{unit}').exists
    assert not host.process.filter(comm='flowworker')
