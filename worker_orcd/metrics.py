"""Prometheus metrics (SPEC 4810-4812), one registry per worker.

A private registry (not prometheus_client's global one) keeps the exposition
to exactly the worker's own series and lets tests build several workers in
one process. Histograms are in milliseconds, as the metric names say.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .errors import ErrorCode

STATES = ("starting", "loading", "ready", "executing", "draining", "stopped")


# inter-token gaps: 1 ms steps up to 20 ms (issue 8's p99 target is ~14 ms on a 7B), then coarser
GAP_BUCKETS_MS = (0.5, *range(1, 21), 25, 30, 40, 50, 75, 100, 200, 500, 1_000, 5_000)

class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._started = time.monotonic()
        self.vram_bytes = Gauge("worker_vram_bytes", "Device bytes held by the resident model (0 in CPU dev mode)", registry=r)
        self.requests = Counter(
            "worker_requests_total", "HTTP requests by outcome: success or the error code they ended with",
            ["outcome"], registry=r,
        )
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
            "worker_inference_duration_ms", "Job wall time from its start until the engine thread returned",
            buckets=(10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000),
            registry=r,
        )
        self.ttft_ms = Histogram(
            "worker_time_to_first_token_ms", "From the job's start (after the seal check) to its first token event",
            buckets=(5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000),
            registry=r,
        )
        self.inter_token_ms = Histogram(
            "worker_inter_token_latency_ms", "Gap between consecutive token events of one job (HTTP side)",
            buckets=GAP_BUCKETS_MS, registry=r,
        )
        self.seal_verify_ms = Histogram(
            "worker_seal_verify_ms", "Seal + residency verification before each execute (SPEC 4121)",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 5_000),
            registry=r,
        )
        # continuous batching (issue 8): fed by the engine loop through the LoopObserver methods below
        self.requests_running = Gauge("worker_requests_running", "Jobs in the engine's running batch", registry=r)
        self.requests_waiting = Gauge(
            "worker_requests_waiting", "Admitted jobs waiting for a batch slot (queued or preempted)", registry=r
        )
        self.kv_blocks_used = Gauge("worker_kv_blocks_used", "KV-cache blocks held by jobs", registry=r)
        self.kv_blocks_total = Gauge("worker_kv_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.batch_size = Histogram(
            "worker_batch_size", "Rows (jobs) per engine step",
            buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256), registry=r,
        )
        self.queue_time_ms = Histogram(
            "worker_queue_time_ms", "From admission until the engine first schedules the job",
            buckets=(0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000), registry=r,
        )
        self.step_interval_ms = Histogram(
            "worker_step_interval_ms",
            "Engine side: time between two consecutive steps' token hand-outs, i.e. every decoding job's "
            "inter-token gap before the HTTP side sees it",
            buckets=GAP_BUCKETS_MS, registry=r,
        )
        self.step_channel_ms = Histogram(
            "worker_step_channel_ms",
            "Engine process: time from the engine handing out a step's tokens to the worker receiving them "
            "(socket, unpickling, the worker's GIL)",
            buckets=GAP_BUCKETS_MS, registry=r,
        )
        self.loop_lag_ms = Histogram(
            "worker_step_loop_lag_ms",
            "Time from a step's tokens being handed to the HTTP event loop to the loop delivering them "
            "(how far behind the event loop runs)",
            buckets=GAP_BUCKETS_MS, registry=r,
        )
        self.preemptions = Counter(
            "worker_preemptions_total", "Jobs preempted (KV blocks ran out) and later recomputed", registry=r
        )
        self.set_state("starting")

    # --- batching.loop.LoopObserver ----------------------------------------------------------

    def step(self, rows: int, tokens: int, running: int, waiting: int, blocks_used: int, blocks_total: int,
             interval_ms: float | None = None) -> None:
        self.batch_size.observe(rows)
        if interval_ms is not None:
            self.step_interval_ms.observe(interval_ms)

    def step_channel(self, ms: float) -> None:
        self.step_channel_ms.observe(ms)

    def bind_engine(self, stats: Callable[[], dict[str, int]]) -> None:
        """The batching gauges read the engine's live counts at scrape time (never stale when idle)."""
        for gauge, key in (
            (self.requests_running, "running"), (self.requests_waiting, "waiting"),
            (self.kv_blocks_used, "kv_blocks_used"), (self.kv_blocks_total, "kv_blocks_total"),
        ):
            gauge.set_function(lambda key=key: float(stats().get(key, 0)))

    def admitted(self, queue_ms: float) -> None:
        self.queue_time_ms.observe(queue_ms)

    def preempted(self) -> None:
        self.preemptions.inc()

    def set_state(self, state: str) -> None:
        for s in STATES:
            self.state.labels(state=s).set(1 if s == state else 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


SUCCESS = "success"
_CODES = frozenset(c.value for c in ErrorCode)
_BY_STATUS = {
    401: ErrorCode.AUTH_FAILED, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND, 503: ErrorCode.WORKER_NOT_READY,
}


def outcome(status: int, code: str | None = None) -> str:
    """The request's outcome label: ``success`` or the error code it ended with.

    Bounded by construction (ErrorCode + one value). A stream that opened with 200 and then
    ended with an ``error`` event counts as that code, not as a success.
    """
    if code is not None:
        return code if code == SUCCESS or code in _CODES else ErrorCode.INTERNAL.value
    if status < 400:
        return SUCCESS
    fallback = ErrorCode.INVALID_PARAMS if status < 500 else ErrorCode.INTERNAL
    return _BY_STATUS.get(status, fallback).value
