"""Prometheus metrics of one service: requests and latencies by endpoint, deletions acknowledged,
pending and applied, the time from acknowledgement to applied, and the shards excluded. Each
service has its own registry (several in one process, as in tests, never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
APPLY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """The service's counters; `render` is the text the /metrics endpoint returns."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sisa_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("sisa_request_seconds", "Request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.acknowledged = Counter("sisa_deletions_acknowledged",
                                    "Deletion requests acknowledged (made durable)", registry=r)
        self.applied = Counter("sisa_deletions_applied", "Deletions applied (shards retrained)",
                               registry=r)
        self.ack_seconds = Histogram("sisa_deletion_ack_seconds",
                                     "Time to make a deletion durable (request to 202)",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.ack_to_applied = Histogram("sisa_deletion_ack_to_applied_seconds",
                                        "Time from a deletion's acknowledgement to its retrained "
                                        "shards going live", buckets=APPLY_BUCKETS, registry=r)
        self.pending = Gauge("sisa_deletions_pending", "Deletions acknowledged and not applied",
                             registry=r)
        self.excluded = Gauge("sisa_excluded_shards", "Shards with records not serving now",
                              registry=r)
        self.shards_loaded = Counter("sisa_checkpoints_loaded",
                                     "Shard checkpoints read from disk into the live model",
                                     registry=r)
        self.worker_failures = Counter("sisa_deletion_worker_failures",
                                       "Runs of the deletion worker that failed", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
