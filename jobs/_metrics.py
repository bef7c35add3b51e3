"""The query server's Prometheus metrics (`GET /metrics`), with the maintained client.

What a search server's operators alert on and plot, as text-embeddings-inference and
Qdrant serve it:

- `quiver_requests_total{endpoint, mode, status}`: every request, by route template
  (`/tables/{name}/search`, never the path a client typed), search mode and status;
- `quiver_request_duration_seconds{endpoint, mode}`: a histogram of whole requests;
- `quiver_search_stage_seconds{table, mode, stage}`: where a search's time went, split
  into query embedding, first stage, rescoring and fetch (`operators.stage_clock`);
- `quiver_rejected_requests_total{status}`: requests refused before any search (400
  bad query, 401 token, 404 unknown table, 409 manifest mismatch, 413 body, 422 body
  schema);
- `quiver_open_table_versions`: versions the server holds open now;
- `quiver_model_loads_total`: query models this process has loaded.

Labels stay bounded: a route template, a mode from a fixed set, a status code, a stage,
and a table name only once the table has been opened (so it names a table in the
warehouse). Never query text, ids or filters.

Each app gets its own registry, so two servers in one process (tests, benchmarks) never
collide on metric names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from operators.stage_clock import STAGES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus' text exposition format, which every scraper reads."""
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
"""Seconds: a search on a warm table takes milliseconds, a first request that loads a
model or opens a table on an object store seconds."""


class _ModelLoads(Collector):
    """Reads the process-wide load count at scrape time (`jobs.table.model_loads`)."""

    def __init__(self, loads: Callable[[], int]) -> None:
        self._loads = loads

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("quiver_model_loads", "Query models loaded by this process.",
                                  value=self._loads())


class ServerMetrics:
    """The server's counters and histograms, and their text for `/metrics`."""

    def __init__(self, *, open_versions: Callable[[], int],
                 model_loads: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("quiver_requests", "HTTP requests by route, mode and status.",
                                ["endpoint", "mode", "status"], registry=self.registry)
        self.duration = Histogram("quiver_request_duration_seconds",
                                  "Whole HTTP requests, by route and mode.",
                                  ["endpoint", "mode"], buckets=LATENCY_BUCKETS,
                                  registry=self.registry)
        self.stages = Histogram("quiver_search_stage_seconds",
                                "Seconds per search stage: " + ", ".join(STAGES) + ".",
                                ["table", "mode", "stage"], buckets=LATENCY_BUCKETS,
                                registry=self.registry)
        self.rejected = Counter("quiver_rejected_requests",
                                "Requests refused before or instead of a search.",
                                ["status"], registry=self.registry)
        gauge = Gauge("quiver_open_table_versions", "Table versions the server holds open.",
                      registry=self.registry)
        gauge.set_function(open_versions)
        self.registry.register(_ModelLoads(model_loads))

    def request(self, endpoint: str, mode: str, status: int, seconds: float) -> None:
        """Count one finished request (any status)."""
        self.requests.labels(endpoint, mode, str(status)).inc()
        self.duration.labels(endpoint, mode).observe(seconds)
        if 400 <= status < 500:
            self.rejected.labels(str(status)).inc()

    def search(self, table: str, mode: str, seconds: dict[str, float]) -> None:
        """Record one search's stage seconds (only the stages it ran)."""
        for name, spent in seconds.items():
            self.stages.labels(table, mode, name).observe(spent)

    def text(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)


RUN_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0)
"""Seconds: a scheduled reindex takes seconds, a rebuild hours."""


def outcome_label(status: str) -> str:
    """A history status as a label value.

    >>> outcome_label("skipped (table busy)"), outcome_label("timed out")
    ('skipped', 'timed_out')
    """
    return status.split(" (")[0].replace(" ", "_")


class SchedulerMetrics:
    """`quiver scheduler --metrics-port`'s metrics: runs by outcome, durations, the last
    success per schedule (an alert's `time() - …` watches it), runs going now, and the
    cost of the runs whose summary priced them. Labels: schedule names (the warehouse's
    own) and a fixed set of outcomes."""

    def __init__(self, history: list[dict] = ()) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter("quiver_schedule_runs", "Scheduled runs by outcome: succeeded, "
                            "failed, timed_out, skipped (table busy), interrupted.",
                            ["schedule", "outcome"], registry=self.registry)
        self.duration = Histogram("quiver_schedule_run_duration_seconds",
                                  "Seconds from a run's start to its outcome.", ["schedule"],
                                  buckets=RUN_BUCKETS, registry=self.registry)
        self.last_success = Gauge("quiver_schedule_last_success_timestamp_seconds",
                                  "Unix time the schedule's last successful run ended.",
                                  ["schedule"], registry=self.registry)
        self.running = Gauge("quiver_schedule_running", "Runs going now.", ["schedule"],
                             registry=self.registry)
        self.cost = Counter("quiver_schedule_cost", "Cost of the runs (`cost.prices`).",
                            ["schedule", "currency"], registry=self.registry)
        self._last: dict[str, float] = {}
        for entry in history:  # the last success survives a restart of the scheduler
            if entry.get("status") == "succeeded" and entry.get("ended"):
                self._succeeded(entry["schedule"], entry["ended"])

    def _succeeded(self, schedule: str, ended: str) -> None:
        stamp = max(datetime.fromisoformat(ended).timestamp(), self._last.get(schedule, 0.0))
        self._last[schedule] = stamp
        self.last_success.labels(schedule).set(stamp)

    def started(self, schedule: str) -> None:
        self.running.labels(schedule).inc()

    def finished(self, entry: dict, *, ran: bool = True) -> None:
        """Count a history entry's outcome; `ran` when `started` was called for it."""
        name, status = entry["schedule"], entry["status"]
        self.runs.labels(name, outcome_label(status)).inc()
        if ran:
            self.running.labels(name).dec()
            if entry.get("ended") and entry.get("started"):
                self.duration.labels(name).observe(max(0.0, (
                    datetime.fromisoformat(entry["ended"])
                    - datetime.fromisoformat(entry["started"])).total_seconds()))
        if status == "succeeded" and entry.get("ended"):
            self._succeeded(name, entry["ended"])
        cost = entry.get("cost") or {}
        if cost.get("total"):
            self.cost.labels(name, cost.get("currency", "")).inc(cost["total"])

    def text(self) -> bytes:
        return generate_latest(self.registry)
