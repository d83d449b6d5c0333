"""Continuous batching through a real ``serve`` process (issue 8): jobs overlap, the wait queue is
bounded, a full queue answers WORKER_BUSY with a retry hint, the batching gauges and /health tell
the truth, and a job's stream is the same whether it ran alone or among others.

The real Qwen2.5-Coder-0.5B in CPU mode (its random-weight twin on the GPU machine), two slots and
a queue of one: a third job waits, a fourth is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from callback_server import CallbackServer
from prometheus_client.parser import text_string_to_metric_families
from test_serve_integration import LONG_JOB, PROMPT, Proc, start, wait_ready, wait_state, write_tokens

from worker_orcd.http.sse import parse

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batched(serve_model_path: Path, device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, str]]:
    tmp = tmp_path_factory.mktemp("serve-batching")
    token_file, a, _ = write_tokens(tmp)
    with CallbackServer() as pm:
        p = start(tmp, [
            "--worker-id", "it-batch", "--device", device, "--model", serve_model_path.name,
            "--model-root", str(serve_model_path.parent), "--port", "0", "--callback-url", pm.url,
            "--max-batch", "2", "--max-queue", "1", "--max-tokens-out", str(LONG_JOB), "--prefill-chunk", "32",
            "--kv-cache-size-mb", "256", "--inference-timeout-sec", "240", "--sse-keepalive-sec", "0.5",
        ], token_file)
        try:
            wait_ready(p, pm)
            yield p, a
        finally:
            if p.proc.poll() is None:
                p.stop()


def metric(p: Proc, name: str) -> float:
    with p.client(None) as c:
        for fam in text_string_to_metric_families(c.get("/metrics").text):
            for s in fam.samples:
                if s.name == name:
                    return float(s.value)
    raise AssertionError(f"no metric {name}")


def tokens(events: list[tuple[str, Any]]) -> list[str]:
    return [d["t"] for e, d in events if e == "token"]


def test_worker_4720_jobs_overlap_queue_then_busy(batched: tuple[Proc, str]) -> None:
    p, token = batched
    opened: list[httpx.Response] = []
    clients: list[httpx.Client] = []
    try:
        for i in range(3):  # two run, the third waits in the queue (admitted: 200 and `started`)
            c = p.client(token)
            clients.append(c)
            r = c.send(c.build_request("POST", "/worker/execute", json={
                "prompt": PROMPT, "params": {"max_tokens": LONG_JOB}, "job_id": f"batch-{i}-{time.monotonic_ns()}"}),
                stream=True)
            assert r.status_code == 200
            opened.append(r)
        lines = [r.iter_lines() for r in opened]
        for it in lines[:2]:  # both running jobs stream tokens at the same time
            while next(it) != "event: token":
                pass
        deadline = time.monotonic() + 30
        while metric(p, "worker_requests_running") != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(p, "worker_requests_running") == 2
        assert metric(p, "worker_requests_waiting") == 1
        assert metric(p, "worker_kv_blocks_used") > 0
        with p.client(None) as c:
            health = c.get("/health").json()
        assert health["batching"] == {"slots_total": 2, "slots_busy": 2, "queue_depth": 1, "queue_limit": 1}
        with p.client(token) as c:
            busy = c.post("/worker/execute", json={"prompt": "x", "params": {"max_tokens": 1}})
        assert busy.status_code == 503 and busy.json()["code"] == "WORKER_BUSY"
        assert busy.json()["retry_after_ms"] > 0 and int(busy.headers["retry-after"]) >= 1
        assert "2 running + 1 queued" in busy.json()["message"]
    finally:
        for r in opened:
            r.close()  # a disconnect cancels each job
        for c in clients:
            c.close()
    wait_state(p, "ready", 60)
    assert metric(p, "worker_requests_running") == 0 and metric(p, "worker_kv_blocks_used") == 0


def test_worker_4710_stream_alone_equals_stream_among_others(batched: tuple[Proc, str]) -> None:
    p, token = batched
    bodies = [
        {"prompt": PROMPT, "params": {"max_tokens": 12}},
        {"prompt": "import os\n", "params": {"max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 5}},
    ]

    def run(body: dict[str, Any]) -> list[str]:
        with p.client(token) as c:
            r = c.post("/worker/execute", json=body)
        assert r.status_code == 200
        ev = parse(r.text)
        assert ev[-1][0] == "end", ev[-1]
        return tokens(ev)

    alone = [run(b) for b in bodies]
    together: list[list[str] | None] = [None, None]

    def one(i: int) -> None:
        together[i] = run(bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
