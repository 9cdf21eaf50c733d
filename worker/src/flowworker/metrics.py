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
  records not yet in PostgreSQL), ``flowworker_drains_total``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# the flow label of a job whose flow this worker does not know: a producer's typo adds no series
UNKNOWN_FLOW = '<unknown>'
# seconds: flows take from milliseconds to the job timeout's hour
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# seconds: an idle worker wakes within milliseconds; a busy queue makes jobs wait minutes
PICKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class WorkerMetrics:
    def __init__(
        self,
        queue: str,
        flows: Collection[str],
        max_jobs: int,
        running: Callable[[], int],
        waiting: Callable[[], int],
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
        Gauge(
            'flowworker_jobs_in_progress', 'jobs this process runs now', registry=self.registry
        ).set_function(running)
        Gauge('flowworker_max_jobs', 'jobs this process runs at most at once', registry=self.registry).set(
            max_jobs
        )
        Gauge(
            'flowworker_records_waiting', 'task records not yet written to PostgreSQL', registry=self.registry
        ).set_function(waiting)

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
