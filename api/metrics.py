"""Prometheus metrics (prometheus-client): requests and latency per endpoint, items per status, memory
size, points waiting for the index, ingest jobs waiting."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from app.services.serving import ServingService

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class MemoryCollector(Collector):
    """Gauges read at scrape time from the service (nothing to keep in sync)."""

    def __init__(self, service: ServingService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        items = GaugeMetricFamily("reco_items", "Items per embedding version and status", labels=["encoder", "status"])
        for encoder, counts in self.service.repo.status_counts().items():
            for status, n in counts.items():
                items.add_metric([encoder, status], n)
        items.add_metric(["-", "deleted"], self.service.repo.count_deleted())
        yield items
        points = GaugeMetricFamily("reco_memory_points", "Points per memory collection", labels=["collection"])
        for name in self.service.store.list_collections():
            points.add_metric([name], self.service.store.collection(name).count())
        yield points
        waiting = GaugeMetricFamily("reco_memory_unindexed_points", "Points searched exactly until indexed",
                                    labels=["collection"])
        for name, n in getattr(self.service.store, "unindexed_points", dict)().items():
            waiting.add_metric([name], n)
        yield waiting
        yield GaugeMetricFamily("reco_ingest_queue_depth", "Ingest jobs queued or running in the server",
                                value=self.service.queue_depth())


class Metrics:
    def __init__(self, service: ServingService) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("reco_http_requests", "HTTP requests", ["method", "endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("reco_http_request_seconds", "HTTP request latency", ["method", "endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(MemoryCollector(service))

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            # the server's own time, so a client can tell it from the network and its own wait
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")  # the template, never the raw path (bounded labels)
            self.requests.labels(request.method, endpoint, str(status)).inc()
            self.latency.labels(request.method, endpoint).observe(time.perf_counter() - started)
