"""Prometheus metrics of one server (prometheus_client, its own registry per app).

Named like vLLM's and TGI's: requests by route and status, prompt and generated tokens, time
to first token and inter-token latency histograms, and the engine's own figures read at scrape
time (queue depth, active sequences, requests finished by reason, steps).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds: from 5 ms (one decode step of a small model) to a minute (a long prompt in a full queue)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
               1.0, 2.5)


class EngineCollector:
    """The engine's ``stats()`` as metrics, read when Prometheus scrapes (no polling thread)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        queued = GaugeMetricFamily("starlift_queue_depth", "Requests waiting for a cache row")
        queued.add_metric([], s["queued"])
        active = GaugeMetricFamily("starlift_active_sequences", "Requests prefilling or decoding (cache rows held)")
        active.add_metric([], s["active"])
        rows = GaugeMetricFamily("starlift_max_sequences", "Cache rows (--max-concurrency)")
        rows.add_metric([], s["max_batch"])
        finished = CounterMetricFamily("starlift_engine_requests_finished", "Requests the engine ended, by reason",
                                       labels=["reason"])
        for reason, count in s["finished"].items():
            finished.add_metric([reason], count)
        steps = CounterMetricFamily("starlift_engine_steps", "Decode steps the engine ran")
        steps.add_metric([], s["steps"])
        return [queued, active, rows, finished, steps]


class Metrics:
    def __init__(self, engine=None):
        disable_created_metrics()  # no *_created series (process-wide; the server process is ours)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("starlift_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("starlift_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("starlift_generation_tokens", "Tokens generated and handed to a client",
                                         registry=r)
        self.ttft = Histogram("starlift_time_to_first_token_seconds", "From submit to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("starlift_inter_token_latency_seconds", "Between two tokens of one request",
                             buckets=ITL_BUCKETS, registry=r)
        self.disconnects = Counter("starlift_client_disconnects", "Requests cancelled because the client left",
                                   registry=r)
        if engine is not None:
            r.register(EngineCollector(engine))
