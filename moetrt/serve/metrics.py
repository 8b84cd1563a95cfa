"""The server's Prometheus metrics (prometheus-client), on a registry of their own.

Names follow Prometheus conventions (base units, `_total` counters) and vLLM's choice of what to expose:
requests by outcome, waiting and running requests, prompt and generated tokens, time to first token (TTFT)
and inter-token latency (ITL) histograms, engine step durations. Each `Metrics` owns a `CollectorRegistry`,
so two servers in one process (tests) do not share counters.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Updated by the app (HTTP outcomes) and the scheduler (everything else); rendered by GET /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moetrt_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "moetrt_requests_finished", "Generation requests ended, by finish reason", ["finish_reason"], registry=r
        )
        self.waiting = Gauge("moetrt_num_requests_waiting", "Requests queued for a free KV slot", registry=r)
        self.slots_busy = Gauge("moetrt_slots_busy", "KV slots held by a running request", registry=r)
        self.slots = Gauge("moetrt_slots", "KV slots of the engine (its max_batch)", registry=r)
        self.prompt_tokens = Counter("moetrt_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("moetrt_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "moetrt_time_to_first_token_seconds", "From submission to the first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "moetrt_inter_token_latency_seconds", "Between consecutive tokens of a request", buckets=ITL_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.step = Histogram(
            "moetrt_engine_step_seconds", "One engine step: a prefill of one slot or a batched decode", ["kind"],
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
