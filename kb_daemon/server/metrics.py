"""Prometheus metrics of one server: requests per route and model, and each host's versions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from kb_daemon.server.hosting import ModelHost

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _HostCollector:
    """Reads each host's state at scrape time (nothing to keep in sync)."""

    def __init__(self, hosts: Mapping[str, ModelHost]) -> None:
        self.hosts = hosts

    def collect(self) -> Iterable[Metric]:
        gauges: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "loaded_version": GaugeMetricFamily("kb_loaded_version", "Version the server answers from",
                                                labels=["model"]),
            "head_version": GaugeMetricFamily("kb_head_version", "Head version last read from the database",
                                              labels=["model"]),
            "lag_versions": GaugeMetricFamily("kb_version_lag", "Head minus loaded version", labels=["model"]),
            "lag_seconds": GaugeMetricFamily("kb_version_lag_seconds", "How long the loaded version has been behind",
                                             labels=["model"]),
            "queue_depth": GaugeMetricFamily("kb_queue_depth", "Queued and running jobs", labels=["model"]),
            "database_ok": GaugeMetricFamily("kb_database_up", "1 when the last head read succeeded", labels=["model"]),
        }
        counters: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "swaps": CounterMetricFamily("kb_version_swaps", "Head versions swapped in since start", labels=["model"]),
            "batches": CounterMetricFamily("kb_batches", "generate() calls answering requests", labels=["model"]),
            "answered": CounterMetricFamily("kb_batched_requests", "Requests answered by those calls",
                                            labels=["model"]),
        }
        for name, host in self.hosts.items():
            state = host.state()
            for field, family in {**gauges, **counters}.items():
                value = getattr(state, field)
                if value is not None:
                    family.add_metric([name], float(value))
        sizes = HistogramMetricFamily("kb_batch_size", "Requests answered per generate() call", labels=["model"])
        for name, host in self.hosts.items():
            counts = dict(host.batch_sizes)
            buckets = [(str(bound), float(sum(n for size, n in counts.items() if size <= bound)))
                       for bound in BATCH_BUCKETS] + [("+Inf", float(sum(counts.values())))]
            sizes.add_metric([name], buckets, float(sum(size * n for size, n in counts.items())))
        yield from gauges.values()
        yield from counters.values()
        yield sizes


class ServerMetrics:
    def __init__(self, hosts: Mapping[str, ModelHost]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kb_http_requests", "HTTP requests by route, model and status",
                                ["route", "model", "status"], registry=self.registry)
        self.latency = Histogram("kb_http_request_seconds", "HTTP request latency by route and model",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_HostCollector(hosts))  # type: ignore[arg-type]

    def observe(self, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
