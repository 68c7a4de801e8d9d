"""Prometheus metrics of one server: requests by status, tokens, latency histograms, and engine
gauges (running / waiting requests, KV cache use, prefix-cache hit rate) read at scrape time.

Each app has its own CollectorRegistry, so several servers can live in one process (tests).
"""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenforge.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                      80.0, 160.0, 640.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                  0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    """Gauges read from the engine core when Prometheus scrapes."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.core.stats()
        gauges = (
            ("tokenforge_num_requests_running", "Requests in the running batch.", stats["num_running"]),
            ("tokenforge_num_requests_waiting", "Requests waiting for admission.", stats["num_waiting"]),
            ("tokenforge_kv_cache_usage_ratio", "Share of KV cache blocks in use (0 to 1).", stats["kv_cache_usage"]),
            ("tokenforge_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens "
             "looked up, since start.", stats["prefix_cache_hit_rate"]),
            ("tokenforge_engine_healthy", "1 while the engine loop is alive and stepping.",
             float(self.engine.is_healthy)),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("tokenforge_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("tokenforge_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("tokenforge_generation_tokens", "Generated tokens.", registry=self.registry)
        self.time_to_first_token = Histogram("tokenforge_time_to_first_token_seconds",
                                             "From admission to the first generated token.",
                                             buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.inter_token_latency = Histogram("tokenforge_inter_token_latency_seconds",
                                             "Between two generated tokens of one request.",
                                             buckets=_ITL_BUCKETS_S, registry=self.registry)
        self.e2e_latency = Histogram("tokenforge_e2e_request_latency_seconds",
                                     "From admission to the last token of one request.",
                                     buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request_timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Latency bookkeeping of one engine request, fed with its output deltas."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.started_at = time.monotonic()
        self.last_token_at: float | None = None

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        num_new = len(out.new_token_ids)
        if num_new:
            if self.last_token_at is None:
                self.metrics.time_to_first_token.observe(now - self.started_at)
                self.metrics.prompt_tokens.inc(out.num_prompt_tokens)
            else:
                # Several tokens in one delta (speculative decoding) share the gap.
                gap = (now - self.last_token_at) / num_new
                for _ in range(num_new):
                    self.metrics.inter_token_latency.observe(gap)
            self.metrics.generation_tokens.inc(num_new)
            self.last_token_at = now
        if out.finished:
            self.metrics.e2e_latency.observe(now - self.started_at)
