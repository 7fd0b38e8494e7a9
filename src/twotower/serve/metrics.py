"""The server's Prometheus metrics (`prometheus_client`), in a registry of their own per server so
that several servers in one process (tests) never share counts. Served at GET /metrics.

  twotower_requests_total{endpoint,mode,status}   finished requests; status is the HTTP status, or
                                                  for a stream the one it ended with (500 when
                                                  decoding failed mid-stream), 499 when the client left
  twotower_queue_depth                            requests waiting for a row
  twotower_running_rows                           rows in the running batch
  twotower_in_flight                              requests accepted and not yet finished
  twotower_generated_tokens_total{mode}           tokens committed by the engine
  twotower_denoiser_forwards_total                batched denoiser forwards (NFE, all rows of one count once)
  twotower_context_forwards_total                 batched context-tower forwards (prefills, block commits, AR steps)
  twotower_engine_failures_total                  engine steps that raised (each recovered as in worker.py)
  twotower_batch_rows                             per engine step: rows it decoded together
  twotower_tokens_per_forward{mode}               per request: tokens / denoiser forwards it took (tau)
  twotower_time_to_first_block_seconds{mode}      request accepted -> its first committed tokens
  twotower_request_latency_seconds{endpoint,mode} request accepted -> last byte
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TAU_BUCKETS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """Every metric of one server. Counters and histograms are thread-safe (the engine thread and
    the event loop both write); gauges read the engine's state when scraped."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("twotower_requests", "Finished requests", ["endpoint", "mode", "status"], registry=r)
        self.queue_depth = Gauge("twotower_queue_depth", "Requests waiting for a row", registry=r)
        self.running_rows = Gauge("twotower_running_rows", "Rows in the running batch", registry=r)
        self.in_flight = Gauge("twotower_in_flight", "Requests accepted and not finished", registry=r)
        self.generated_tokens = Counter(
            "twotower_generated_tokens", "Tokens committed by the engine", ["mode"], registry=r
        )
        self.denoiser_forwards = Counter("twotower_denoiser_forwards", "Batched denoiser forwards", registry=r)
        self.context_forwards = Counter("twotower_context_forwards", "Batched context-tower forwards", registry=r)
        self.engine_failures = Counter("twotower_engine_failures", "Engine steps that raised", registry=r)
        self.batch_rows = Histogram(
            "twotower_batch_rows", "Rows decoded together per engine step", buckets=ROW_BUCKETS, registry=r
        )
        self.tokens_per_forward = Histogram(
            "twotower_tokens_per_forward",
            "Per request: generated tokens per denoiser forward",
            ["mode"],
            buckets=TAU_BUCKETS,
            registry=r,
        )
        self.time_to_first_block = Histogram(
            "twotower_time_to_first_block_seconds",
            "Request accepted to its first committed tokens",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "twotower_request_latency_seconds",
            "Request accepted to its last byte",
            ["endpoint", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def observe_request(
        self,
        *,
        endpoint: str,
        mode: str,
        status: int,
        seconds: float,
        first_tokens_s: float | None = None,
        tokens_per_forward: float | None = None,
    ) -> None:
        """One finished request (rejected ones too: mode "none" when it was never parsed)."""
        self.requests.labels(endpoint, mode, str(status)).inc()
        self.latency.labels(endpoint, mode).observe(seconds)
        if first_tokens_s is not None:
            self.time_to_first_block.labels(mode).observe(first_tokens_s)
        if tokens_per_forward is not None and mode != "ar":
            self.tokens_per_forward.labels(mode).observe(tokens_per_forward)

    def watch(self, *, queue_depth: Callable[[], int], running_rows: Callable[[], int], in_flight: Callable[[], int]):
        """Gauges read these when scraped."""
        self.queue_depth.set_function(queue_depth)
        self.running_rows.set_function(running_rows)
        self.in_flight.set_function(in_flight)

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples called `name` whose labels include `labels`, in exposition text (None
    if there is none): for tests and the load test."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None
