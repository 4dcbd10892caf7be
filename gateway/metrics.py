"""Prometheus metrics of one gateway (a registry of its own, so apps built in one process
do not collide)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics"]

# The *_created series double the output and say nothing a scraper needs here.
disable_created_metrics()


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Proxied requests by route, status and instance",
            ["service", "route", "method", "status", "instance"],
            registry=r,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to response, retries included",
            ["service"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_duration_seconds",
            "Time of one upstream attempt",
            ["instance"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.retries = Counter(
            "gateway_retries", "Attempts repeated on another instance", ["service", "reason"], registry=r
        )
        self.rejections = Counter(
            "gateway_rejections",
            "Requests the gateway answered itself",
            ["service", "reason"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "gateway_breaker_transitions",
            "Circuit breaker state changes",
            ["instance", "from_state", "to_state"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "gateway_breaker_open", "1 while the instance's breaker is open", ["instance"], registry=r
        )
        self.in_flight = Gauge("gateway_in_flight", "Requests in flight through this gateway", ["instance"], registry=r)
        self.load_alerts = Counter("gateway_load_alerts", "Load threshold alerts", ["service", "instance"], registry=r)
        self.websockets = Gauge("gateway_websockets_open", "Proxied WebSocket connections", ["service"], registry=r)
        self.limiter_degraded = Gauge(
            "gateway_limiter_degraded", "1 while Redis is unreachable (local limits)", registry=r
        )

        self._children: dict[tuple, Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the hot path calls this a few times a request."""
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def render(self) -> bytes:
        return generate_latest(self.registry)
