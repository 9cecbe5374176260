"""Prometheus metrics under the `pnl:` prefix, named as vLLM's `vllm:` ones, in a registry of our own.

Scheduler state (running/waiting requests, KV usage, prefix cache, preemptions) is read at scrape time
from the snapshot the engine thread publishes; request counters and latency histograms are updated
by the engine thread when a request finishes or is first scheduled.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from professional_nano_llm.engine.outputs import RequestMetrics
from professional_nano_llm.server.async_engine import EngineSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py)
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
_REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0]


disable_created_metrics()  # no *_created series (process-wide; vLLM's exposition has none either)


class _SchedulerCollector:
    """Gauges and cumulative counters read from the engine's latest snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str):
        self.snapshot, self.model_name = snapshot, model_name

    def collect(self):
        s, labels = self.snapshot(), ["model_name"]
        values = [
            (GaugeMetricFamily, "pnl:num_requests_running", "Requests in the running batch.", s.num_running),
            (GaugeMetricFamily, "pnl:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            (GaugeMetricFamily, "pnl:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
             s.num_used_blocks / s.num_blocks if s.num_blocks else 0.0),
            (CounterMetricFamily, "pnl:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_queries),
            (CounterMetricFamily, "pnl:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hits),
            (CounterMetricFamily, "pnl:num_preemptions", "Sequences preempted (to be recomputed).", s.num_preemptions),
        ]
        for family, name, doc, value in values:
            metric = family(name, doc, labels=labels)
            metric.add_metric([self.model_name], value)
            yield metric


class ServerMetrics:
    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot]):
        self.model_name = model_name
        self.registry = registry = CollectorRegistry()
        registry.register(_SchedulerCollector(snapshot, model_name))
        labels = ["model_name"]
        self.prompt_tokens = Counter("pnl:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=registry).labels(model_name)
        self.generation_tokens = Counter("pnl:generation_tokens", "Generated tokens (aborted requests included).",
                                         labels, registry=registry).labels(model_name)
        self.request_success = Counter("pnl:request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=registry)
        self.ttft = Histogram("pnl:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=registry).labels(model_name)
        self.itl = Histogram("pnl:inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request.", labels,
                             buckets=_ITL_BUCKETS, registry=registry).labels(model_name)
        self.e2e = Histogram("pnl:e2e_request_latency_seconds", "Arrival in the engine to finish.", labels,
                             buckets=_REQUEST_BUCKETS, registry=registry).labels(model_name)
        self.queue_time = Histogram("pnl:request_queue_time_seconds", "Arrival in the engine to first scheduled.",
                                    labels, buckets=_REQUEST_BUCKETS, registry=registry).labels(model_name)
        for reason in ("stop", "length", "abort"):  # present (at 0) from the first scrape
            self.request_success.labels(model_name, reason)

    def request_scheduled(self, queue_time: float) -> None:
        self.queue_time.observe(queue_time)

    def request_finished(self, request_id: str, num_prompt: int, num_generated: int, reason: str,
                         m: RequestMetrics) -> None:
        self.prompt_tokens.inc(num_prompt)
        self.generation_tokens.inc(num_generated)
        self.request_success.labels(self.model_name, reason).inc()
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
