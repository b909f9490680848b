"""Prometheus metrics of the router, per worker, in their own registry. They are read from the
workers' own counts when /metrics is scraped, so the two never disagree."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from radixflow.runtime.router.workers import WorkerPool

_P = "radixflow_router_"


class _PoolCollector:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        workers = list(self.pool.workers.values())
        families = [
            (CounterMetricFamily, "requests", "Requests dispatched to the worker (attempts)", "requests"),
            (CounterMetricFamily, "failures", "Attempts that failed before the answer began", "failures"),
            (CounterMetricFamily, "cache_affinity_hits", "Requests routed to the worker for its cached prefix",
             "affinity_hits"),
            (GaugeMetricFamily, "in_flight_requests", "Requests whose answer has not ended", "in_flight"),
            (GaugeMetricFamily, "worker_healthy", "1 if the worker gets traffic", "healthy"),
        ]
        for cls, name, doc, attr in families:
            fam = cls(_P + name, doc, labels=["worker"])
            for w in workers:
                fam.add_metric([w.url], float(getattr(w, attr)))
            yield fam
        tree = GaugeMetricFamily(_P + "tree_chars", "Characters in the worker's approximate prefix tree",
                                 labels=["worker"])
        for w in workers:
            tree.add_metric([w.url], float(w.tree.size))
        yield tree


class RouterMetrics:
    """Per worker: requests, failures, cache-affinity hits (counters); in-flight requests,
    health, tree size (gauges). `render()` gives the Prometheus text format."""

    def __init__(self, pool: WorkerPool) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)
