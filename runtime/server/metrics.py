"""Prometheus metrics of one server, in their own registry (never the global default one).

Latencies are measured in the HTTP process from the arrival of a request; gauges about the
KV pool and the queues are refreshed from the scheduler's `get_info` when /metrics is read.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                    3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                1.0, 2.0, 5.0)


class ServerMetrics:
    """Counters, histograms and gauges; `render()` gives the Prometheus text format."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "radixflow_"
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token (streamed requests)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between output tokens (streamed requests)",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.cached_tokens = Counter(p + "cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.requests = Counter(p + "requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.rejected = Counter(p + "rejected_requests", "Requests refused at the door, by HTTP status",
                                ["status"], registry=r)
        self.in_flight = Gauge(p + "in_flight_requests", "Requests the HTTP process is waiting on", registry=r)
        self.num_running = Gauge(p + "num_running_reqs", "Requests in the running batch", registry=r)
        self.num_waiting = Gauge(p + "num_waiting_reqs", "Requests queued in the scheduler", registry=r)
        self.kv_usage = Gauge(p + "kv_pool_usage_ratio",
                              "Share of KV slots held by requests or locked prefixes (not free, not evictable)",
                              registry=r)
        self.kv_cached = Gauge(p + "kv_pool_cached_tokens", "KV slots holding evictable cached prefixes",
                               registry=r)
        self.kv_pool_size = Gauge(p + "kv_pool_size_tokens", "KV slots in the pool", registry=r)
        self.cache_hit_rate = Gauge(p + "cache_hit_rate", "Prompt tokens served from the cache / queried",
                                    registry=r)

    def observe_finished(self, meta: dict[str, Any], e2e: float) -> None:
        fr = meta.get("finish_reason") or {}
        self.requests.labels(fr.get("type", "unknown")).inc()
        self.prompt_tokens.inc(meta.get("prompt_tokens", 0))
        self.generation_tokens.inc(meta.get("completion_tokens", 0))
        self.cached_tokens.inc(meta.get("cached_tokens", 0))
        self.e2e.observe(e2e)

    def update_scheduler(self, info: dict[str, Any]) -> None:
        pool = max(1, info["pool_size"])
        self.kv_pool_size.set(info["pool_size"])
        self.num_running.set(info["num_running"])
        self.num_waiting.set(info["num_waiting"])
        self.kv_usage.set((pool - info["free_slots"] - info["evictable_slots"]) / pool)
        self.kv_cached.set(info["evictable_slots"])
        self.cache_hit_rate.set(info.get("cache", {}).get("hit_rate", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
