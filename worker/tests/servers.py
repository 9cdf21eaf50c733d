"""Real redis-server and PostgreSQL processes on free ports, and worker processes, for the tests."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from flowworker.acl import RULES

WORKER_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f'{what} did not happen within {timeout}s')
        time.sleep(interval)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(('127.0.0.1', port)) == 0


@dataclass(frozen=True)
class TLSFiles:
    """A test CA and a server certificate it signs, for 127.0.0.1 and localhost (openssl)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> TLSFiles:
        files = cls(directory / 'ca.crt', directory / 'server.crt', directory / 'server.key')
        (directory / 'server.ext').write_text('subjectAltName=DNS:localhost,IP:127.0.0.1\n')
        for argv in [
            'req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=test-ca'
            ' -keyout ca.key -out ca.crt',
            'req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost -keyout server.key'
            ' -out server.csr',
            'x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext'
            ' -out server.crt',
        ]:
            subprocess.run(['openssl', *argv.split()], cwd=directory, check=True, capture_output=True)
        return files

    def server_options(self) -> list[str]:
        """TLS only (port 0), replication and a sentinel's links to its nodes too."""
        return [
            '--tls-cert-file', str(self.cert), '--tls-key-file', str(self.key),
            '--tls-ca-cert-file', str(self.ca), '--tls-auth-clients', 'no', '--tls-replication', 'yes',
        ]  # fmt: skip


class RedisServer:
    """A redis-server whose clients log in as flowworker's ACL users (``flowworker.acl``).

    ``default`` is off: the tests' own handles log in as ``admin`` (``url``), the workers as
    ``worker`` and the monitors as ``monitor``, so a command their rules leave out fails a test.
    With ``tls`` it serves TLS only (``rediss://`` URLs; clients verify with ``tls.ca``).
    """

    def __init__(self, directory: Path, extra: Sequence[str] = (), tls: TLSFiles | None = None) -> None:
        self.directory = directory
        self.extra = extra  # more configuration, as redis-server's command-line options
        self.tls = tls
        self.port = free_port()
        self.url = self.url_of('admin')
        self.worker_url = self.url_of('worker')
        self.monitor_url = self.url_of('monitor')
        self.process: subprocess.Popen[bytes] | None = None

    def listen(self) -> list[str]:
        if self.tls is None:
            return ['--port', str(self.port)]
        return ['--port', '0', '--tls-port', str(self.port), *self.tls.server_options()]

    def url_of(self, user: str) -> str:
        return f'{"rediss" if self.tls else "redis"}://{user}:{user}-password@127.0.0.1:{self.port}/0'

    def start(self) -> None:
        users = [['--user', 'default', 'reset', 'off']] + [
            ['--user', user, 'reset', 'on', f'>{user}-password', *RULES[user]] for user in RULES
        ]
        self.process = subprocess.Popen(
            [
                'redis-server',
                *self.listen(),
                '--bind',
                '127.0.0.1',
                '--dir',
                str(self.directory),
                '--save',
                '',
                '--appendonly',
                'no',
                '--notify-keyspace-events',
                'Kz',
                '--loglevel',
                'warning',
                *(arg for user in users for arg in user),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: _port_open(self.port), 10, 'redis-server start')

    def stop(self, save: bool = True) -> None:
        """Shut down (saving the dataset to disk, so a restart keeps the queue, as a packaged Redis does)."""
        tls = ['--tls', '--cacert', str(self.tls.ca)] if self.tls else []
        mode = 'save' if save else 'nosave'
        subprocess.run(
            ['redis-cli', '-u', self.url, *tls, '--no-auth-warning', 'shutdown', mode],
            check=False,
            capture_output=True,
        )
        assert self.process is not None
        self.process.wait(10)


class SentinelGroup:
    """A master, one replica and one Redis Sentinel that watches them (quorum 1), for failovers.

    Both data nodes are :class:`RedisServer` (flowworker's ACL users, ``default`` off); the
    replica logs in to its master as ``replica``, the sentinel to both as ``sentinel``, with
    nothing more than those users' rules allow. The sentinel has a password of its own. With
    ``tls`` all of it is TLS only: the nodes, the sentinel, replication and the sentinel's links.
    """

    NAME = 'flowmaster'
    PASSWORD = 'sentinel-password'

    def __init__(self, directory: Path, tls: TLSFiles | None = None) -> None:
        self.directory = directory
        self.tls = tls
        # either may be the replica after a failover: both log in to their master as replica
        auth = ('--masteruser', 'replica', '--masterauth', 'replica-password')
        (directory / 'a').mkdir()
        (directory / 'b').mkdir()
        self.nodes = [RedisServer(directory / 'a', auth, tls)]
        self.nodes.append(
            RedisServer(directory / 'b', (*auth, '--replicaof', '127.0.0.1', str(self.nodes[0].port)), tls)
        )
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``REDIS_SENTINELS``."""
        return f'127.0.0.1:{self.port}'

    def client(self) -> redis.Redis:
        ca = str(self.tls.ca) if self.tls else None
        return redis.Redis(
            port=self.port, password=self.PASSWORD, decode_responses=True, ssl=bool(self.tls), ssl_ca_certs=ca
        )

    def master(self) -> RedisServer:
        """The node the sentinel names master now."""
        with self.client() as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(self.NAME)
        return next(node for node in self.nodes if node.port == int(port))

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        config = self.directory / 'sentinel.conf'  # the sentinel rewrites it as it learns
        options = self.tls.server_options() if self.tls else []
        # the same settings as config lines: the sentinel rewrites this file
        pairs = zip(options[::2], options[1::2], strict=True)
        tls = ''.join(f'{name[2:]} {value}\n' for name, value in pairs)
        port = f'port 0\ntls-port {self.port}\n{tls}' if self.tls else f'port {self.port}\n'
        config.write_text(
            f'{port}bind 127.0.0.1\ndir {self.directory}\nlogfile {self.directory}/sentinel.log\n'
            f'requirepass {self.PASSWORD}\n'
            f'sentinel monitor {self.NAME} 127.0.0.1 {self.nodes[0].port} 1\n'
            f'sentinel down-after-milliseconds {self.NAME} 1000\n'
            f'sentinel failover-timeout {self.NAME} 5000\n'
            f'sentinel auth-user {self.NAME} sentinel\nsentinel auth-pass {self.NAME} sentinel-password\n'
        )
        self.process = subprocess.Popen(
            ['redis-server', str(config), '--sentinel'], stdout=subprocess.DEVNULL
        )
        wait_until(lambda: _port_open(self.port), 10, 'redis-sentinel start')
        wait_until(self.replica_ready, 20, 'the sentinel to see the replica in sync')

    def replica_ready(self) -> bool:
        """The sentinel sees a replica in sync, so SENTINEL FAILOVER has one to promote."""
        with self.client() as sentinel:
            return any(
                not (replica['is_sdown'] or replica['is_disconnected'])
                and replica['master-link-status'] == 'ok'
                for replica in sentinel.sentinel_slaves(self.NAME)
            )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        for node in self.nodes:
            node.stop(save=False)


class PostgresServer:
    """A PostgreSQL cluster; ``durable`` keeps fsync on, as production runs it (tests turn it off)."""

    def __init__(self, directory: Path, durable: bool = False) -> None:
        self.directory = directory
        self.durable = durable
        self.data = directory / 'data'
        self.port = free_port()
        self.bin = _postgres_bin()
        # initdb refuses to run as root: run the server as the postgres system user then
        self.user = 'postgres' if os.geteuid() == 0 else None

    def _run(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        prefix = ['runuser', '-u', self.user, '--'] if self.user else []
        return subprocess.run([*prefix, *argv], check=True, capture_output=True)

    def init(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        password_file = self.directory / 'password'
        password_file.write_text('postgres\n')
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.directory, pw.pw_uid, pw.pw_gid)
            os.chown(password_file, pw.pw_uid, pw.pw_gid)
        self._run(
            str(self.bin / 'initdb'),
            '-D',
            str(self.data),
            '-U',
            'postgres',
            '--auth=scram-sha-256',
            f'--pwfile={password_file}',
            '-E',
            'UTF8',
        )

    def start(self) -> None:
        self._run(
            str(self.bin / 'pg_ctl'),
            '-D',
            str(self.data),
            '-w',
            '-l',
            str(self.directory / 'log'),
            '-o',
            f'-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1'
            + ('' if self.durable else ' -c fsync=off'),
            'start',
        )

    def stop(self) -> None:
        self._run(str(self.bin / 'pg_ctl'), '-D', str(self.data), '-w', '-m', 'fast', 'stop')

    def dsn(self, user: str = 'postgres', password: str = 'postgres', database: str = 'postgres') -> str:
        return f'postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}'


def _postgres_bin() -> Path:
    versions = sorted(Path('/usr/lib/postgresql').glob('*/bin/initdb'), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise RuntimeError(
            'PostgreSQL server binaries not found under /usr/lib/postgresql: run `make bootstrap`'
        )
    return versions[-1].parent


class WorkerProcess:
    """``flowworker worker`` as a real subprocess; its log goes to a file the test can read."""

    COMMAND = (sys.executable, '-m', 'flowworker', 'worker')

    def __init__(
        self,
        worker_id: str,
        env: Mapping[str, str],
        args: list[str],
        log: Path,
        command: Sequence[str] = COMMAND,
    ) -> None:
        self.worker_id = worker_id
        self.log = log
        self._file = log.open('wb')
        self.process = subprocess.Popen(
            [*command, *args],
            env={**os.environ, 'FLOWWORKER_WORKER_ID': worker_id, **env},
            stdout=self._file,
            stderr=subprocess.STDOUT,
            cwd=WORKER_ROOT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text()

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._file.close()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        if self.alive():
            self.signal(signal.SIGTERM)
        try:
            return self.wait(30)
        except subprocess.TimeoutExpired as timeout:
            self.process.kill()
            self.process.wait()
            # what the process said before it hung, for the report
            said = self.output()
            raise AssertionError(f'{self.log.name} did not stop within 30 s of SIGTERM:\n{said}') from timeout
