"""Prometheus metrics of one server: requests by status, tokens, latency histograms (all models
together), and engine gauges per served model (`model` label: running / waiting requests, KV cache
use, prefix-cache hit rate, health) read at scrape time.

Each app has its own CollectorRegistry, so several servers can live in one process (tests).
"""

import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenforge.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                      80.0, 160.0, 640.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                  0.4, 0.5, 0.75, 1.0, 2.5)


_ENGINE_GAUGES = (
    ("tokenforge_num_requests_running", "Requests in the running batch."),
    ("tokenforge_num_requests_waiting", "Requests waiting for admission."),
    ("tokenforge_kv_cache_usage_ratio", "Share of KV cache blocks in use (0 to 1)."),
    ("tokenforge_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up, "
     "since start."),
    ("tokenforge_engine_healthy", "1 while the engine loop is alive and stepping."),
)


class _EngineCollector(Collector):
    """Gauges read from each model's engine core when Prometheus scrapes, labelled by served name."""

    def __init__(self, engines: Mapping):
        self.engines = engines

    def collect(self):
        families = [GaugeMetricFamily(name, doc, labels=["model"]) for name, doc in _ENGINE_GAUGES]
        for model, engine in self.engines.items():
            stats = engine.core.stats()
            values = (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"],
                      stats["prefix_cache_hit_rate"], float(engine.is_healthy))
            for family, value in zip(families, values, strict=True):
                family.add_metric([model], value)
        yield from families


# Speculative decoding (engine stats spec_*, since start), only for models that speculate.
_SPEC_GAUGES = (
    ("tokenforge_spec_decode_num_draft_tokens", "spec_num_draft_tokens", "Draft tokens proposed, since start."),
    ("tokenforge_spec_decode_num_accepted_tokens", "spec_num_accepted_tokens",
     "Draft tokens the target model accepted, since start."),
    ("tokenforge_spec_decode_acceptance_rate", "spec_acceptance_rate", "Accepted / drafted tokens, since start."),
    ("tokenforge_spec_decode_mean_accepted_length", "spec_mean_accepted_length",
     "Tokens per verification step (accepted drafts plus the target's own), since start."),
)


class _SpecDecodeCollector(Collector):
    """Speculative-decoding gauges read from each engine core's stats at scrape time."""

    def __init__(self, engines: Mapping):
        self.engines = engines

    def collect(self):
        families = [(GaugeMetricFamily(name, doc, labels=["model"]), key) for name, key, doc in _SPEC_GAUGES]
        for model, engine in self.engines.items():
            stats = engine.core.stats()
            for family, key in families:
                if key in stats:
                    family.add_metric([model], stats[key])
        yield from (family for family, _ in families)


class ServerMetrics:
    def __init__(self, engines: Mapping):
        """`engines`: served name -> AsyncEngine, for the per-model gauges."""
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
        self.registry.register(_EngineCollector(engines))
        self.registry.register(_SpecDecodeCollector(engines))

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
