"""The SSE token fast path (http/protocol.py ``DirectBody``, http/stream.py ``JobStream._deliver``).

While a stream's response task waits on an empty queue, the loop callback that hands an engine
step over writes each token frame to the connection itself. These tests run the real server
(fake engine) and check that the path is taken, that frames keep the engine's order when tokens
switch between the fast path and the queue (backpressure), that a stop string written on the
fast path still ends the answer, and that a stream fed only by direct writes sends no keep-alives.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_http_fakes import MODEL_NAME, Knobs, WorkerHarness

from worker_orcd.http import protocol
from worker_orcd.http.sse import KEEPALIVE, parse


@pytest.fixture()
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    seen: list[bytes] = []
    real = protocol.DirectBody.write

    def counting(self: protocol.DirectBody, body: bytes) -> None:
        seen.append(body)
        real(self, body)

    monkeypatch.setattr(protocol.DirectBody, "write", counting)
    return seen


def _execute(h: WorkerHarness, prompt: str, n: int) -> str:
    with h.client().stream("POST", "/worker/execute", json={"prompt": prompt, "params": {"max_tokens": n}}) as r:
        assert r.status_code == 200
        return r.read().decode()


def _tokens(raw: str) -> tuple[list[str], list[int], str]:
    events = parse(raw)
    names = [e for e, _ in events]
    toks = [d for e, d in events if e == "token"]
    return names, [d["i"] for d in toks], "".join(d["t"] for d in toks)


@pytest.fixture()
def h(tmp_path: Path) -> Iterator[WorkerHarness]:
    with WorkerHarness(tmp_path, Knobs(step_s=0.002), sse_keepalive_sec=0.1) as harness:
        yield harness


def test_tokens_leave_through_the_direct_path(h: WorkerHarness, writes: list[bytes]) -> None:
    raw = _execute(h, "abcdefghij", 40)
    names, idx, text = _tokens(raw)
    assert names == ["started"] + ["token"] * 40 + ["metrics", "end"]
    assert idx == list(range(40)) and text == "abcdefghij" * 4
    direct = [parse(w.decode()) for w in writes]
    assert sum(len(f) for f in direct) >= 20, "most tokens should be written by the step hand-over itself"
    assert all(e == "token" for f in direct for e, _ in f)  # only tokens take the fast path
    with h.client() as c:  # every hand-over's wait for the event loop was measured
        lag = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("worker_step_loop_lag_ms_count ")]
    assert lag and float(lag[0].split()[-1]) >= 20


def test_no_keepalive_between_direct_tokens(h: WorkerHarness, writes: list[bytes]) -> None:
    # 60 tokens at 2 ms each: ~0.12 s of stream against a 0.1 s keep-alive; the response task waits the whole
    # time (tokens go out directly), so only a clock that ignored direct writes would add keep-alives
    h.knobs.step_s = 0.004
    raw = _execute(h, "xyz", 60)
    assert writes and KEEPALIVE.decode() not in raw


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_order_kept_when_tokens_switch_paths(h: WorkerHarness, monkeypatch: pytest.MonkeyPatch, seed: int,
                                              writes: list[bytes]) -> None:
    """A socket that pushes back at random (``ready`` false): those tokens queue, and every later one must
    queue behind them until the task has drained the queue."""
    rng = random.Random(seed)
    real = protocol.DirectBody.ready
    monkeypatch.setattr(protocol.DirectBody, "ready", lambda self: real(self) and rng.random() < 0.5)
    h.knobs.step_s = 0.0  # bursts: several tokens per hand-over
    raw = _execute(h, "0123456789", 200)
    names, idx, text = _tokens(raw)
    assert names == ["started"] + ["token"] * 200 + ["metrics", "end"]
    assert idx == list(range(200)) and text == "0123456789" * 20
    assert writes  # both paths were taken


def test_openai_stop_string_on_the_direct_path(h: WorkerHarness, writes: list[bytes]) -> None:
    body = {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 30, "temperature": 0, "stream": True,
            "stop": ["wor"]}
    with h.client() as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200
    chunks: list[Any] = []
    for line in r.text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            chunks.append(payload if payload == "[DONE]" else json.loads(payload))
    assert chunks[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == "hello " and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert writes
    with h.client() as c:  # the job ended as a success and the worker takes the next one
        assert c.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["text"] == "hello "


def test_tokens_of_one_hand_over_leave_in_one_write(h: WorkerHarness, writes: list[bytes]) -> None:
    """An event loop that fell behind drains several steps at once: each stream's frames go out in one write."""
    import threading
    import time

    h.knobs.step_s = 0.005
    assert h._loop is not None
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(_execute(h, "abcdefghij", 120)))
    t.start()
    time.sleep(0.15)  # the stream is running
    h._loop.call_soon_threadsafe(time.sleep, 0.2)  # the loop stalls while ~40 steps' tokens arrive
    t.join(30)
    names, idx, text = _tokens(out[0])
    assert idx == list(range(120)) and text == "abcdefghij" * 12
    assert max(len(parse(w.decode())) for w in writes) >= 10, [len(parse(w.decode())) for w in writes]
