"""What `GET /metrics` shows, in Prometheus' text format (prometheus_client), in a registry
of the server's own (a test that starts two apps in one process gets two)."""

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
    registry: object = field(default_factory=prometheus.CollectorRegistry)

    def __post_init__(self):
        r = self.registry
        self.requests = prometheus.Counter("runner_requests", "HTTP requests by endpoint and status",
                                           ["endpoint", "status"], registry=r)
        self.latency = prometheus.Histogram("runner_request_seconds", "request latency by endpoint",
                                            ["endpoint"], registry=r)
        self.queue_depth = prometheus.Gauge("runner_queue_depth", "jobs waiting for the model", ["model"], registry=r)
        self.active_sequences = prometheus.Gauge("runner_active_sequences", "conversations decoding together",
                                                 ["model"], registry=r)
        self.batch_rows = prometheus.Histogram("runner_batch_rows", "rows per forward pass (one call per linear)",
                                               ["model", "kind"], buckets=ROW_BUCKETS, registry=r)
        self.routes = prometheus.Gauge("runner_route_calls", "linear calls per route (TPU / CPU) since start",
                                       ["model", "route", "unit"], registry=r)
        self.prefix_cache = prometheus.Counter("runner_prefix_cache", "prompt-prefix cache lookups",
                                               ["model", "result"], registry=r)
        self.generated_tokens = prometheus.Counter("runner_generated_tokens", "tokens generated", ["model"],
                                                   registry=r)

    def text(self) -> bytes:
        return prometheus.generate_latest(self.registry)


METRICS = Metrics()
