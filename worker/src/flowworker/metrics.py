"""Each worker process's own metrics, in Prometheus's conventions, on ``FLOWWORKER_METRICS_PORT``.

Counters and histograms, so rates and quantiles are PromQL's (``rate(flowworker_tasks_total[5m])``,
``histogram_quantile(0.99, ...)``) and survive nothing but the process, as Prometheus expects of a
target. Labels stay bounded: the queue, the flows the worker registered (any other name counts
as ``<unknown>``), the fixed statuses.

- ``flowworker_tasks_total{queue,flow,status}``: attempts that ended (succeeded, failed, retrying,
  cancelled, interrupted);
- ``flowworker_task_duration_seconds{queue,flow}``: how long the attempts that ran took;
- ``flowworker_pickup_latency_seconds{queue}``: from when a job was due (arq's score: enqueued, or
  its defer time) to when this worker started it;
- ``flowworker_jobs_in_progress``, ``flowworker_max_jobs``, ``flowworker_records_waiting`` (task
  records not yet in PostgreSQL), ``flowworker_records_written_total`` (rows the store wrote:
  waiting records and none written is a store that cannot write), ``flowworker_drains_total``;
- ``flowworker_worker_info{worker_id,queue,version}`` (always 1): which worker process a target is,
  to join its series with its heartbeat;
- ``flowworker_redis_reconnects_total``, ``flowworker_database_reconnects_total``: connections this
  process lost and made anew (``infrastructure.count_redis_reconnects`` and
  ``count_database_reconnects``).

A reconnect is counted where the library makes it, one per connection that broke and was
replaced, and never for a connection opened at start-up or as the pool grows:

- Redis: a connection object of the process's one pool (arq's poll loop, job bookkeeping,
  heartbeat, spilled records and the wake-up's subscription all share it) connecting again after
  an error ended its socket: the server closed it (``CLIENT KILL``, a restart, a timeout), a read
  or write failed; or connecting to another server than before (with Sentinel, after a failover:
  redis-py closes the pool's idle connections to the old master once a sentinel names the new
  one). flowworker's own recovery points (the poll loop's back-off, the wake-up's
  re-subscribe, a heartbeat that failed) would miss most of them: redis-py's retry
  (``infrastructure.create_redis``) re-makes a broken connection and re-subscribes a pub/sub
  before flowworker sees an error, and a connection killed while idle in the pool is replaced the
  next time it is handed out. Each connection counts once per loss, however many tries its
  reconnect took; one killed while idle that no later burst needs again is not re-made, so not
  counted. No label: one pool serves every client in the process, and which part of flowworker
  used a connection is not the connection's to know.
- PostgreSQL: an entry of the records engine's pool connecting again (SQLAlchemy's ``connect``
  event for an entry seen connecting before): SQLAlchemy dropped its connection as broken (a
  failed pre-ping at check-out, a disconnect seen by a statement, a failed reset at check-in) or
  retired it with the rest of the pool after such a disconnect (after a failover or a restart
  they are all dead). The store's flusher talks to asyncpg directly, so its broken connection is
  found by the pre-ping at its next check-out, and counted there. Not counted: an entry's first
  connection, nor one replacing a connection that reached ``DATABASE_POOL_RECYCLE``'s age.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from .version import VERSION

# the flow label of a job whose flow this worker does not know: a producer's typo adds no series
UNKNOWN_FLOW = '<unknown>'
# seconds: flows take from milliseconds to the job timeout's hour
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# seconds: an idle worker wakes within milliseconds; a busy queue makes jobs wait minutes
PICKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _ReadCounter:
    """A counter whose value another object keeps and this reads at each scrape."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


class WorkerMetrics:
    def __init__(
        self,
        worker_id: str,
        queue: str,
        flows: Collection[str],
        max_jobs: int,
        *,
        running: Callable[[], int],
        waiting: Callable[[], int],
        written: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queue = queue
        self.flows = frozenset(flows)
        self._tasks = Counter(
            'flowworker_tasks',
            'task attempts that ended, by status',
            ['queue', 'flow', 'status'],
            registry=self.registry,
        )
        self._duration = Histogram(
            'flowworker_task_duration_seconds',
            'how long the attempts that ran took',
            ['queue', 'flow'],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._pickup = Histogram(
            'flowworker_pickup_latency_seconds',
            'seconds from when a job was due to when this worker started it',
            ['queue'],
            buckets=PICKUP_BUCKETS,
            registry=self.registry,
        )
        self.drains = Counter(
            'flowworker_drains',
            'times this process stopped picking jobs (SIGUSR1, SIGTERM)',
            registry=self.registry,
        )
        self.redis_reconnects = Counter(
            'flowworker_redis_reconnects',
            'Redis connections this process lost (closed by the server, a read or write failed) and re-made',
            registry=self.registry,
        )
        self.database_reconnects = Counter(
            'flowworker_database_reconnects',
            'PostgreSQL connections of the records pool found broken and replaced by a new one',
            registry=self.registry,
        )
        Gauge(
            'flowworker_jobs_in_progress', 'jobs this process runs now', registry=self.registry
        ).set_function(running)
        Gauge('flowworker_max_jobs', 'jobs this process runs at most at once', registry=self.registry).set(
            max_jobs
        )
        Gauge(
            'flowworker_records_waiting', 'task records not yet written to PostgreSQL', registry=self.registry
        ).set_function(waiting)
        self.registry.register(
            _ReadCounter('flowworker_records_written', 'task record rows written to PostgreSQL', written)
        )
        Info('flowworker_worker', 'the worker process behind this target', registry=self.registry).info(
            {'worker_id': worker_id, 'queue': queue, 'version': VERSION}
        )

    def started(self, waited: float) -> None:
        self._pickup.labels(self.queue).observe(max(waited, 0.0))

    def ended(self, flow: str, status: str, ran: float | None) -> None:
        if flow not in self.flows:
            flow = UNKNOWN_FLOW
        self._tasks.labels(self.queue, flow, status).inc()
        if ran is not None:
            self._duration.labels(self.queue, flow).observe(ran)

    def serve(self, address: str, port: int) -> WSGIServer:
        """Serve /metrics in a thread of its own; raises OSError when the port is taken."""
        server, _ = start_http_server(port, addr=address, registry=self.registry)
        return server

    @staticmethod
    def stop(server: WSGIServer) -> None:
        """End the serving thread and close its socket (blocks up to its poll interval)."""
        server.shutdown()
        server.server_close()
