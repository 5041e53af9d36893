"""Prometheus metrics, in a registry owned by one app (two apps in a process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    """The coordinator's counters, histograms and gauges."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fedlm_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.updates_accepted = Counter(
            "fedlm_updates_accepted", "Updates stored durably", registry=r
        )
        self.updates_rejected = Counter(
            "fedlm_updates_rejected", "Updates refused, by error code", ["code"], registry=r
        )
        self.updates_dropped = Counter(
            "fedlm_updates_dropped",
            "Stored updates dropped at aggregation, by reason (zero_weight, non_finite_effect, "
            "aggregation_failed, lora_mismatch, undecodable)",
            ["reason"],
            registry=r,
        )
        self.update_bytes = Counter("fedlm_update_bytes", "Bytes of accepted updates", registry=r)
        self.aggregations = Counter("fedlm_aggregations", "Global versions published", registry=r)
        self.aggregation_seconds = Histogram(
            "fedlm_aggregation_seconds", "Time to aggregate one version", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )  # fmt: skip
        self.global_version = Gauge(
            "fedlm_global_version", "Current global adapter version", registry=r
        )
        self.pending_updates = Gauge(
            "fedlm_pending_updates", "Updates waiting for aggregation", registry=r
        )
        self.clients = Gauge("fedlm_clients", "Enrolled clients", registry=r)
        self.connections_open = Gauge(
            "fedlm_connections_open", "Open HTTP connections (admitted by the guard)", registry=r
        )
        self.connections_closed = Counter(
            "fedlm_connections_closed",
            "Connections closed or refused by the guard: timeouts and caps, by reason",
            ["reason"],
            registry=r,
        )
        self.dp_epsilon = Gauge(
            "fedlm_dp_epsilon", "Central DP epsilon spent so far (0 without DP)", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
