"""bad_inputs: after every catalogued bad input failed, the host holds nothing of the role."""

from __future__ import annotations

import pytest
from conftest import SCENARIO

pytestmark = pytest.mark.skipif(SCENARIO != 'bad_inputs', reason='bad_inputs scenario only')


def test_no_user_no_files_no_units(host):
    assert not host.user('arq-worker').exists
    for path in (
        '/opt/arq-worker',
        '/etc/arq-worker',
        '/srv/arq-worker',
        '/var/log/arq-worker',
        '/etc/systemd/system/arq-worker@.service',
        '/etc/systemd/system/arq-worker.target',
        '/etc/security/limits.d/60-arq-worker.conf',
        '/etc/sysctl.d/60-arq-worker.conf',
    ):
        assert not host.file(path).exists, path
    assert host.run("systemctl list-units --all --plain --no-legend 'arq-worker*'").stdout.strip() == ''
