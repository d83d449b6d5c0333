"""Prometheus metrics (SPEC 4810-4812), one registry per worker.

A private registry (not prometheus_client's global one) keeps the exposition
to exactly the worker's own series and lets tests build several workers in
one process. Histograms are in milliseconds, as the metric names say.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

STATES = ("starting", "loading", "ready", "executing", "draining", "stopped")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._started = time.monotonic()
        self.vram_bytes = Gauge("worker_vram_bytes", "Device bytes held by the resident model (0 in CPU dev mode)", registry=r)
        self.requests = Counter("worker_requests_total", "HTTP requests by outcome", ["outcome"], registry=r)
        self.jobs_started = Counter("worker_jobs_started_total", "Inference jobs that started streaming", registry=r)
        self.jobs_completed = Counter("worker_jobs_completed_total", "Jobs that ended with an end event", registry=r)
        self.jobs_failed = Counter(
            "worker_jobs_failed_total", "Jobs that ended with an error event, by code", ["code"], registry=r
        )
        self.tokens_in = Counter("worker_tokens_in_total", "Prompt tokens processed", registry=r)
        self.tokens_generated = Counter("worker_tokens_generated_total", "Tokens generated", registry=r)
        self.cuda_errors = Counter("worker_cuda_errors_total", "CUDA/driver errors seen by the engine", registry=r)
        self.uptime = Gauge("worker_uptime_seconds", "Seconds since the process started", registry=r)
        self.uptime.set_function(lambda: time.monotonic() - self._started)
        self.state = Gauge("worker_state", "1 for the worker's current lifecycle state, else 0", ["state"], registry=r)
        self.inference_ms = Histogram(
            "worker_inference_duration_ms", "Job wall time from stream start until the engine stopped",
            buckets=(10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000),
            registry=r,
        )
        self.ttft_ms = Histogram(
            "worker_time_to_first_token_ms", "Time from job start to the first generated token",
            buckets=(5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000),
            registry=r,
        )
        self.inter_token_ms = Histogram(
            "worker_inter_token_latency_ms", "Gap between consecutive generated tokens",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000),
            registry=r,
        )
        self.seal_verify_ms = Histogram(
            "worker_seal_verify_ms", "Seal + residency verification before each execute (SPEC 4121)",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 5_000),
            registry=r,
        )
        self.set_state("starting")

    def set_state(self, state: str) -> None:
        for s in STATES:
            self.state.labels(state=s).set(1 if s == state else 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def outcome(status: int) -> str:
    """Coarse request outcome label; bounded cardinality by construction."""
    if status < 400:
        return "success"
    if status in (401, 403):
        return "unauthorized"
    if status == 503:
        return "unavailable"
    if status < 500:
        return "client_error"
    return "server_error"
