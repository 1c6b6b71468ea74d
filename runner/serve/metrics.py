"""What `GET /metrics` shows, in Prometheus' text format (prometheus_client).

Two registries, one per process (runner/serve/worker.py): the HTTP process counts requests,
their latency and the tokens it sent; the engine process what the models did (queue depth,
rows per forward pass, routes, prefix-cache lookups). /metrics shows the HTTP process's,
then the engine process's, each family once. A test that starts two apps in one process
gets registries of its own (`Metrics()`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..packages import require

prometheus = require("prometheus_client", "`runner serve` reports its metrics with it")

# Fine enough that the batches which formed can be priced on the Pi 5 model (bench/serve.py):
# there the Coral pays from about 100 rows a call, and a pass is up to max-batch decode rows
# plus a prefill chunk of 64.
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 72, 80, 96, 112, 128, 192, 256, 512)


@dataclass
class Metrics:
    http: object = field(default_factory=prometheus.CollectorRegistry)  # the HTTP process's
    engine: object = field(default_factory=prometheus.CollectorRegistry)  # the engine process's

    def __post_init__(self):
        r, e = self.http, self.engine
        self.requests = prometheus.Counter("runner_requests", "HTTP requests by endpoint and status",
                                           ["endpoint", "status"], registry=r)
        self.latency = prometheus.Histogram("runner_request_seconds", "request latency by endpoint",
                                            ["endpoint"], registry=r)
        self.generated_tokens = prometheus.Counter("runner_generated_tokens", "tokens generated", ["model"],
                                                   registry=r)
        self.queue_depth = prometheus.Gauge("runner_queue_depth", "jobs waiting for the model", ["model"], registry=e)
        self.active_sequences = prometheus.Gauge("runner_active_sequences", "conversations decoding together",
                                                 ["model"], registry=e)
        self.batch_rows = prometheus.Histogram("runner_batch_rows", "rows per forward pass (one call per linear)",
                                               ["model", "kind"], buckets=ROW_BUCKETS, registry=e)
        self.routes = prometheus.Gauge("runner_route_calls", "linear calls per route (TPU / CPU) since start",
                                       ["model", "route", "unit"], registry=e)
        self.prefix_cache = prometheus.Counter("runner_prefix_cache", "prompt-prefix cache lookups",
                                               ["model", "result"], registry=e)

    def http_text(self) -> bytes:
        return prometheus.generate_latest(self.http)

    def engine_text(self) -> bytes:
        return prometheus.generate_latest(self.engine)


METRICS = Metrics()
