"""The Redis ACL rules of flowworker's clients: what a worker and the monitor may do, and no more.

flowworker issues the commands, so it says which it needs. The Redis server's users are made
from these rules (the deployment roles load this file on the controller, so it imports nothing
beyond the standard library); the tests run every worker and monitor operation as these users,
so a command the rules leave out fails a test, not a fleet.

- ``worker``: arq's keys (``arq:*``) and flowworker's own (``flowworker:*``: job timeouts, task
  records waiting for the database, the wake-up's probe); the keyspace events of the queues and
  of the probe (the wake-up subscribes to them); reads, writes, transactions. No command of
  ``@dangerous`` or ``@admin`` (FLUSHALL, FLUSHDB, KEYS, CONFIG, SHUTDOWN, DEBUG, MODULE, ACL,
  ...), only INFO, which arq logs when a worker starts; and flowworker's own scripts, by
  EVALSHA after SCRIPT LOAD (``batches.py``: a poll claims several jobs, and their ends are
  written together, in one round trip each). A script runs with the permissions of the user that
  calls it (its commands and keys are checked as if sent one by one), so this lets a worker do
  nothing it could not do before, only do it atomically; EVAL of script text stays refused.
- ``monitor``: arq's keys, reads and writes (a cancel, a purge), no channel, no dangerous command.
- ``admin``: everything, for operators (``redis-cli --user admin --askpass KEYS 'arq:worker:*'``).

With Redis's replication and Sentinel, the servers log in to each other too; their users get
what Redis's own replication and Sentinel send, no key and no other command:

- ``replica``: what a replica sends its master (``masteruser``): PING, REPLCONF, PSYNC.
- ``sentinel``: what a Redis Sentinel sends the servers it watches (``sentinel auth-user``): INFO
  and ROLE to learn the topology, the hello channel it shares with the other sentinels, and a
  failover's MULTI, REPLICAOF (SLAVEOF), CONFIG REWRITE, CLIENT KILL and SCRIPT KILL.
"""

from __future__ import annotations

# the wake-up proves that Redis publishes keyspace events by writing a key of its own
WAKEUP_PROBE_PREFIX = 'flowworker:wakeup-probe:'

_NO_DANGER = ('-@dangerous', '-@admin')
_DATA = ('-@all', '+@read', '+@write', '+@keyspace', '+@transaction', '+@connection')

RULES: dict[str, tuple[str, ...]] = {
    'worker': (
        'resetkeys',
        '~arq:*',
        '~flowworker:*',
        'resetchannels',
        '&__keyspace@*__:arq:queue:*',
        f'&__keyspace@*__:{WAKEUP_PROBE_PREFIX}*',
        *_DATA,
        '+@pubsub',
        *_NO_DANGER,
        '+info',
        '+evalsha',
        '+script|load',
    ),
    'monitor': ('resetkeys', '~arq:*', 'resetchannels', *_DATA, *_NO_DANGER),
    'admin': ('~*', '&*', '+@all'),
    'replica': ('resetkeys', 'resetchannels', '-@all', '+ping', '+replconf', '+psync'),
    'sentinel': (
        'resetkeys',
        'resetchannels',
        '&__sentinel__:hello',
        '-@all',
        '+ping',
        '+info',
        '+role',
        '+subscribe',
        '+publish',
        '+client|setname',
        '+client|kill',
        '+multi',
        '+exec',
        '+slaveof',
        '+replicaof',
        '+config|rewrite',
        '+script|kill',
    ),
}


def acl_rules(role: str) -> str:
    """The rules of ``role`` (worker, monitor, admin, replica, sentinel), as ``ACL SETUSER`` takes them."""
    if role not in RULES:
        raise ValueError(f'role must be one of {", ".join(RULES)} (got {role!r})')
    return ' '.join(RULES[role])
