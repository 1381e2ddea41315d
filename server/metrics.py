"""Prometheus metrics, one registry per app (tests run several apps in one process).

The hot path stays free of metric calls: chunks are counted per stream by the core
and read at scrape time; everything else moves once per stream, request or error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .pricing import cache_read_savings

# Seconds: first tokens arrive in 0.2-5 s from real models; whole answers take up to minutes.
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ChunkCollector(Collector):
    """Chunks relayed: those of finished streams plus, at scrape time, those of running ones."""

    def __init__(self, finished: Callable[[], int], running: Callable[[], int]) -> None:
        self.finished = finished
        self.running = running

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("deltarelay_chunks_relayed", "Text chunks relayed to clients' streams")
        family.add_metric([], self.finished() + self.running())
        yield family


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: half the output, and Prometheus does not need them
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.active_streams = Gauge("deltarelay_active_streams", "Clients reading a stream now, by transport",
                                    ["transport"], registry=registry)
        self.generating = Gauge("deltarelay_streams_generating", "Answers being generated now", registry=registry)
        self.started = Counter("deltarelay_streams_started", "Answers started", registry=registry)
        self.finished = Counter("deltarelay_streams_finished", "Answers ended, by saved status", ["status"],
                                registry=registry)
        self.first_token = Histogram("deltarelay_time_to_first_token_seconds",
                                     "From the user's message to the first text chunk", buckets=FIRST_TOKEN_BUCKETS,
                                     registry=registry)
        self.duration = Histogram("deltarelay_stream_duration_seconds", "From the user's message to the saved answer",
                                  buckets=DURATION_BUCKETS, registry=registry)
        self.upstream_errors = Counter("deltarelay_upstream_errors", "Upstream failures, retried ones included",
                                       ["code"], registry=registry)
        self.retries = Counter("deltarelay_upstream_retries", "Upstream requests sent again after a failure",
                               registry=registry)
        self.resumes = Counter("deltarelay_resumes", "Streams read again from a Last-Event-ID, by transport",
                               ["transport"], registry=registry)
        self.dropped = Counter("deltarelay_slow_subscribers_dropped", "Readers dropped for falling too far behind",
                               ["transport"], registry=registry)
        self.refused = Counter("deltarelay_limit_refusals", "Requests refused by a per-user limit", ["limit"],
                               registry=registry)
        self.tokens = Counter("deltarelay_tokens", "Tokens of saved answers, by model and kind", ["model", "kind"],
                              registry=registry)
        self.cost = Counter("deltarelay_cost_dollars", "Recorded cost of saved answers in US dollars", ["model"],
                            registry=registry)
        self.cache_savings = Counter("deltarelay_cache_savings_dollars",
                                     "What cache reads saved against uncached input, in US dollars", ["model"],
                                     registry=registry)
        self.tool_calls = Counter("deltarelay_tool_calls", "Calls to the agents' own tools, by result (ok, error)",
                                  ["result"], registry=registry)
        self.chunks_finished = 0
        self.readers = {transport: self.active_streams.labels(transport) for transport in ("sse", "websocket")}

    def count_chunks_of_running(self, running: Callable[[], int]) -> None:
        self.registry.register(_ChunkCollector(lambda: self.chunks_finished, running))

    def record_answer(self, model: str, input_tokens: int, output_tokens: int, cache_write: int, cache_read: int,
                      cost: Decimal | None) -> None:
        for kind, count in (("input", input_tokens), ("output", output_tokens), ("cache_write", cache_write),
                            ("cache_read", cache_read)):
            if count:
                self.tokens.labels(model, kind).inc(count)
        if cost:
            self.cost.labels(model).inc(float(cost))  # metrics are floats; the exact figure is in the database
        saved = cache_read_savings(cache_read, model) if cache_read else None
        if saved:
            self.cache_savings.labels(model).inc(float(saved))

    def render(self) -> bytes:
        return generate_latest(self.registry)
