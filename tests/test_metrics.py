"""Prometheus metrics (SPEC 4810-4812): exact deltas after real requests, labels, registry isolation.

Runs the real HTTP stack with the fake engine (test_http_fakes.WorkerHarness)
and parses the exposition with prometheus_client's own parser. The same
scrape against the real model in a real process is in test_serve_integration.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from test_http_fakes import TOKEN_B, Knobs, WorkerHarness, iter_events

from worker_orcd.errors import ErrorCode
from worker_orcd.metrics import STATES, SUCCESS, Metrics, outcome

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_exposition(text: str) -> Scrape:
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(client: httpx.Client) -> Scrape:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_exposition(r.text)


def value(s: Scrape, name: str, **labels: str) -> float:
    return s.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHarness]:
    with WorkerHarness(tmp_path_factory.mktemp("metrics"), Knobs(step_s=0.02), max_tokens_out=400) as harness:
        yield harness


def idle(h: WorkerHarness) -> bool:
    w = h.worker
    return w is not None and w.scheduler.active is None and w.state.value == "ready"


def test_worker_4811_exact_deltas_after_completed_busy_invalid_unauthorized_cancelled(h: WorkerHarness) -> None:
    anon = h.client(None)
    before = scrape(anon)
    c = h.client()
    done = list(iter_events(c.post("/worker/execute", json={"prompt": "abcd", "params": {"max_tokens": 5}})))
    assert done[-1][0] == "end" and done[-1][1]["tokens_out"] == 5
    with c.stream("POST", "/worker/execute", json={"prompt": "xyz", "params": {"max_tokens": 200}, "job_id": "m-cancel"}) as r:
        it = iter_events(r)
        got = [next(it) for _ in range(3)]  # started + 2 tokens
        busy = h.client(TOKEN_B).post("/worker/execute", json={"prompt": "q", "params": {"max_tokens": 1}})
        assert busy.status_code == 503 and busy.json()["code"] == "WORKER_BUSY"
        assert h.client("not-a-valid-token-at-all").post("/cancel", json={"job_id": "m-cancel"}).status_code == 401
        assert c.post("/cancel", json={"job_id": "m-cancel"}).status_code == 202
        got += list(it)
    assert got[-1][0] == "error" and got[-1][1]["code"] == "CANCELLED"
    n_cancelled = sum(1 for e, _ in got if e == "token")
    assert c.post("/worker/execute", json={"prompt": "abc", "params": {"temperature": 5}}).status_code == 400
    wait_until(lambda: idle(h), 5)  # the cancelled job's engine thread has returned
    after = scrape(anon)

    assert delta(after, before, "worker_requests_total", outcome=SUCCESS) == 3  # first scrape, completed job, cancel
    for code in ("CANCELLED", "WORKER_BUSY", "AUTH_FAILED", "INVALID_PARAMS"):
        assert delta(after, before, "worker_requests_total", outcome=code) == 1, code
    assert delta(after, before, "worker_jobs_started_total") == 2
    assert delta(after, before, "worker_jobs_completed_total") == 1
    assert delta(after, before, "worker_jobs_failed_total", code="CANCELLED") == 1
    assert delta(after, before, "worker_tokens_in_total") == 4 + 3
    assert delta(after, before, "worker_tokens_generated_total") == 5 + n_cancelled
    assert delta(after, before, "worker_time_to_first_token_ms_count") == 2
    assert delta(after, before, "worker_inter_token_latency_ms_count") == (5 - 1) + (n_cancelled - 1)
    assert delta(after, before, "worker_inference_duration_ms_count") == 2
    assert delta(after, before, "worker_inference_duration_ms_sum") >= 2 * 20  # two jobs, >= 1 decode step each
    assert delta(after, before, "worker_seal_verify_ms_count") == 2  # busy/invalid never reached the seal
    assert delta(after, before, "worker_cuda_errors_total") == 0
    assert value(after, "worker_vram_bytes") == 0  # CPU development mode holds no VRAM
    assert value(after, "worker_uptime_seconds") > value(before, "worker_uptime_seconds") > 0
    assert {s: value(after, "worker_state", state=s) for s in STATES} == {s: float(s == "ready") for s in STATES}


def test_worker_4811_disconnect_counts_as_cancelled(h: WorkerHarness) -> None:
    assert h.worker is not None
    reg = h.worker.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return reg.get_sample_value(name, labels) or 0.0

    failed, cancelled = sample("worker_jobs_failed_total", code="CANCELLED"), sample("worker_requests_total", outcome="CANCELLED")
    with h.client().stream("POST", "/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 200}}) as r:
        it = iter_events(r)
        while next(it)[0] != "token":
            pass
    wait_until(lambda: idle(h) and sample("worker_requests_total", outcome="CANCELLED") == cancelled + 1, 5)
    assert sample("worker_jobs_failed_total", code="CANCELLED") == failed + 1


def test_worker_4810_histograms_have_millisecond_buckets_and_metrics_need_no_token(h: WorkerHarness) -> None:
    text = h.client(None).get("/metrics").text
    s = parse_exposition(text)
    for name, low, high in (
        ("worker_inference_duration_ms", 10, 300_000),
        ("worker_time_to_first_token_ms", 5, 30_000),
        ("worker_inter_token_latency_ms", 0.5, 5_000),
        ("worker_seal_verify_ms", 0.1, 5_000),
    ):
        bounds = sorted(float(dict(k[1])["le"]) for k in s if k[0] == f"{name}_bucket")
        assert bounds[0] == low and bounds[-2] == high and bounds[-1] == float("inf"), (name, bounds)
    assert "worker_requests_total" in text and "# TYPE worker_state gauge" in text


def test_worker_4810_each_worker_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.jobs_started.inc()
    a.set_state("executing")
    assert a.registry.get_sample_value("worker_jobs_started_total") == 1
    assert b.registry.get_sample_value("worker_jobs_started_total") == 0
    assert b.registry.get_sample_value("worker_state", {"state": "starting"}) == 1
    assert REGISTRY.get_sample_value("worker_jobs_started_total") is None  # never the global default registry
    names = {f.name for f in text_string_to_metric_families(a.render()[0].decode())}
    assert {
        "worker_vram_bytes", "worker_requests", "worker_jobs_started", "worker_jobs_completed", "worker_jobs_failed",
        "worker_tokens_in", "worker_tokens_generated", "worker_cuda_errors", "worker_uptime_seconds", "worker_state",
        "worker_inference_duration_ms", "worker_time_to_first_token_ms", "worker_inter_token_latency_ms",
        "worker_seal_verify_ms",
    } <= names


def test_worker_4810_state_gauge_has_exactly_one_state_set() -> None:
    m = Metrics()
    for state in STATES:
        m.set_state(state)
        assert [s for s in STATES if m.registry.get_sample_value("worker_state", {"state": s}) == 1] == [state]


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (200, None, SUCCESS), (200, SUCCESS, SUCCESS), (200, "CANCELLED", "CANCELLED"), (401, None, "AUTH_FAILED"),
        (403, None, "FORBIDDEN"), (404, None, "NOT_FOUND"), (405, None, "INVALID_PARAMS"), (503, None, "WORKER_NOT_READY"),
        (503, "WORKER_BUSY", "WORKER_BUSY"), (500, None, "INTERNAL"), (507, "INSUFFICIENT_VRAM", "INSUFFICIENT_VRAM"),
        (200, "made-up label", "INTERNAL"),  # never an unbounded label value
    ],
)
def test_worker_4810_outcome_label_is_bounded(status: int, code: str | None, expected: str) -> None:
    assert outcome(status, code) == expected
    assert expected == SUCCESS or expected in {c.value for c in ErrorCode}


def test_worker_4810_uptime_moves(h: WorkerHarness) -> None:
    assert h.worker is not None
    reg = h.worker.metrics.registry
    first = reg.get_sample_value("worker_uptime_seconds")
    threading.Event().wait(0.05)
    assert first is not None and (reg.get_sample_value("worker_uptime_seconds") or 0) >= first + 0.05
