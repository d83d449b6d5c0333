"""SSE streaming, the single slot, cancellation, disconnects and timeouts (fake engine, real server).

SPEC 4246-4253, Scheduler (M0), WORK /cancel, 4420-4423, 4950-4951.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from test_http_fakes import EOS, TOKEN_A, TOKEN_B, Knobs, WorkerHarness, iter_events

from worker_orcd.http.sse import parse


@pytest.fixture()
def knobs() -> Knobs:
    return Knobs(step_s=0.01)


@pytest.fixture()
def h(tmp_path: Path, knobs: Knobs) -> Iterator[WorkerHarness]:
    with WorkerHarness(tmp_path, knobs, sse_keepalive_sec=0.1) as harness:
        yield harness


def wait_until(cond: Any, timeout: float, step: float = 0.01) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


def idle(h: WorkerHarness) -> bool:
    assert h.worker is not None
    return h.worker.scheduler.active is None and h.worker.state.value == "ready"


# --- shapes and order (4246-4248, 4253) -----------------------------------------------------


def test_worker_4246_event_order_and_payload_shapes(h: WorkerHarness) -> None:
    with h.client().stream("POST", "/worker/execute", json={"prompt": "héllo 🙂 wörld", "params": {"max_tokens": 12}},
                           headers={"X-Correlation-Id": "corr-1"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-correlation-id"] == "corr-1"
        raw = r.read().decode()
    events = parse(raw)
    names = [e for e, _ in events]
    assert names == ["started"] + ["token"] * 12 + ["metrics", "end"]
    started = events[0][1]
    assert set(started) == {"job_id", "model", "started_at", "correlation_id"}
    assert started["model"] == "tiny.gguf" and started["correlation_id"] == "corr-1"
    assert started["job_id"] == r.headers["x-job-id"]
    tokens = [d for e, d in events if e == "token"]
    assert all(set(t) == {"t", "i"} for t in tokens) and [t["i"] for t in tokens] == list(range(12))
    # 4247: text is UTF-8 safe: never a split character, never a replacement character.
    assert "".join(t["t"] for t in tokens) == "héllo 🙂 "  # 12 byte tokens: the emoji's 4 came out as one
    assert "\ufffd" not in raw
    end = events[-1][1]
    assert {"tokens_in", "tokens_out", "decode_time_ms", "ttft_ms", "stop_reason"} <= set(end)
    assert end["tokens_out"] == 12 and end["stop_reason"] == "max_tokens" and end["tokens_in"] == len("héllo 🙂 wörld".encode())
    assert raw.endswith("\n\n") and raw.count("event: end") == 1  # nothing after end (4253)


def test_worker_4247_eos_ends_stream_without_special_text(h: WorkerHarness, knobs: Knobs) -> None:
    knobs.eos_after = 3
    with h.client().stream("POST", "/execute", json={"prompt": "abcdef", "params": {"max_tokens": 10}}) as r:
        events = list(iter_events(r))
    tokens = [d for e, d in events if e == "token"]
    assert [t["t"] for t in tokens] == ["a", "b", "c", ""]  # the EOS token is counted, not printed
    assert events[-1] == ("end", events[-1][1]) and events[-1][1]["stop_reason"] == "eos"
    assert events[-1][1]["tokens_out"] == 4


def test_worker_4247_unfinished_character_at_max_tokens_kept_as_tail(h: WorkerHarness) -> None:
    with h.client().stream("POST", "/worker/execute", json={"prompt": "a🙂", "params": {"max_tokens": 3}}) as r:
        events = list(iter_events(r))
    assert "".join(d["t"] for e, d in events if e == "token") == "a"
    assert events[-1][1]["tail"] == "\ufffd"  # two bytes of the emoji: surfaced, not silently lost


def test_worker_4712_request_sampling_params_reach_the_engine(h: WorkerHarness, knobs: Knobs) -> None:
    """What the request asks for is what the engine is given (stop ids: the model's EOS ids plus the
    request's). Same seed -> same stream is shown on the real engine: test_serve_integration.py."""
    params = {"max_tokens": 8, "temperature": 0.9, "top_k": 40, "top_p": 0.8, "min_p": 0.05,
              "repetition_penalty": 1.1, "seed": 2**64 - 1, "stop_token_ids": [200]}  # fmt: skip
    with h.client().stream("POST", "/worker/execute", json={"prompt": "abcdefgh", "params": params}) as r:
        assert r.status_code == 200
        list(iter_events(r))
    got = knobs.params_seen[-1]
    want = {k: v for k, v in params.items() if k != "stop_token_ids"}
    assert {k: getattr(got, k) for k in want} == want
    assert got.stop_ids == frozenset({EOS, 200})


def test_worker_4246_keepalive_comments_while_prefilling(h: WorkerHarness, knobs: Knobs) -> None:
    knobs.prefill_s = 0.5
    with h.client().stream("POST", "/worker/execute", json={"prompt": "ab", "params": {"max_tokens": 2}}) as r:
        events = list(iter_events(r))
    names = [e for e, _ in events]
    first_token = names.index("token")
    assert names[0] == "started" and "comment" in names[1:first_token]
    assert names[-1] == "end"


# --- the single slot (Scheduler M0) ---------------------------------------------------------


def test_worker_m0_concurrent_execute_is_busy_with_retry_after(h: WorkerHarness, knobs: Knobs) -> None:
    knobs.step_s = 0.05
    with h.client().stream("POST", "/worker/execute", json={"prompt": "abcd", "params": {"max_tokens": 20}}) as r:
        it = iter_events(r)
        assert next(it)[0] == "started"
        busy = h.client(TOKEN_B).post("/worker/execute", json={"prompt": "x"})
        assert busy.status_code == 503
        body = busy.json()
        assert body["code"] == "WORKER_BUSY" and body["retriable"] is True and body["retry_after_ms"] > 0
        assert int(busy.headers["retry-after"]) >= 1
        rest = list(it)
    assert rest[-1][0] == "end"
    wait_until(lambda: idle(h), 2)
    again = h.client(TOKEN_B).post("/worker/execute", json={"prompt": "x", "params": {"max_tokens": 1}})
    assert again.status_code == 200 and parse(again.text)[-1][0] == "end"
    assert knobs.max_active == 1


# --- cancellation (WORK /cancel, 4251-4252) -------------------------------------------------


def test_worker_4252_cancel_mid_stream_no_token_after_ack(h: WorkerHarness, knobs: Knobs) -> None:
    knobs.step_s = 0.02
    c = h.client()
    received: list[tuple[str, Any]] = []
    with c.stream("POST", "/worker/execute", json={"prompt": "abcdefgh", "params": {"max_tokens": 200}, "job_id": "job-c1"}) as r:
        it = iter_events(r)
        while sum(1 for e, _ in received if e == "token") < 3:
            received.append(next(it))
        ack = c.post("/cancel", json={"job_id": "job-c1"})
        t_ack = time.monotonic()
        received.extend(it)
    assert ack.status_code == 202
    body = ack.json()
    assert body["job_id"] == "job-c1" and body["status"] == "cancel_accepted"
    tokens = [d for e, d in received if e == "token"]
    # Exactly the tokens sent before the acknowledgement arrive; then the CANCELLED error, then nothing.
    assert len(tokens) == body["tokens_sent"]
    assert received[-1][0] == "error" and received[-1][1]["code"] == "CANCELLED"
    assert [e for e, _ in received].count("error") == 1 and "end" not in [e for e, _ in received]
    # The engine saw the flag within about one decode step, and the slot is free again.
    wait_until(lambda: idle(h), 2)
    assert knobs.cancel_seen_at and knobs.cancel_seen_at[-1] - t_ack < 0.5
    # Idempotent: the same answer again, after the job ended.
    again = c.post("/cancel", json={"job_id": "job-c1"})
    assert again.status_code == 202 and again.json() == body


def test_worker_4251_cancel_with_another_token_forbidden(h: WorkerHarness, knobs: Knobs) -> None:
    knobs.step_s = 0.02
    with h.client(TOKEN_A).stream("POST", "/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 15}, "job_id": "job-own"}) as r:
        it = iter_events(r)
        assert next(it)[0] == "started"
        foreign = h.client(TOKEN_B).post("/cancel", json={"job_id": "job-own"})
        events = list(it)
    assert foreign.status_code == 403 and foreign.json()["code"] == "FORBIDDEN"
    assert events[-1][0] == "end"  # the job was not touched


def test_worker_disconnect_mid_stream_frees_slot_within_a_second(h: WorkerHarness, knobs: Knobs) -> None:
    knobs.step_s = 0.02
    u = urlsplit(h.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    body = b'{"prompt": "abcdef", "params": {"max_tokens": 240}}'
    sock.sendall(
        b"POST /worker/execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN_A}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    seen = b""
    while seen.count(b"event: token") < 2:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen
    assert h.worker is not None and h.worker.scheduler.active is not None
    sock.close()
    t0 = time.monotonic()
    wait_until(lambda: idle(h), 1.0)
    assert time.monotonic() - t0 < 1.0
    assert knobs.generations == 1 and knobs.active == 0
    ok = h.client().post("/worker/execute", json={"prompt": "z", "params": {"max_tokens": 1}})
    assert ok.status_code == 200


# --- timeout and failures (4420-4423, 4950) -------------------------------------------------


def test_worker_4420_inference_timeout(tmp_path: Path) -> None:
    knobs = Knobs(step_s=0.05)
    with WorkerHarness(tmp_path, knobs, inference_timeout_sec=0.3) as h:
        t0 = time.monotonic()
        with h.client().stream("POST", "/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 200}}) as r:
            events = list(iter_events(r))
        elapsed = time.monotonic() - t0
        err = events[-1]
        assert err[0] == "error" and err[1]["code"] == "INFERENCE_TIMEOUT" and err[1]["retriable"] is True
        assert set(err[1]) == {"code", "message", "retriable", "retry_after_ms"}
        assert 0.3 <= elapsed < 2
        wait_until(lambda: idle(h), 1)


def test_worker_4950_engine_exception_becomes_internal_without_leaking(h: WorkerHarness, knobs: Knobs) -> None:
    knobs.fail_at = 2
    with h.client().stream("POST", "/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 10}}) as r:
        raw = r.read().decode()
    events = parse(raw)
    assert [e for e, _ in events] == ["started", "token", "token", "error"]
    err = events[-1][1]
    assert err["code"] == "INTERNAL" and "job" in err["message"]
    assert "deadbeef" not in raw and "nvidia" not in raw  # internals stay in the log...
    internal = [json.loads(line) for line in h.log_lines() if '"event":"internal_error"' in line][-1]
    assert internal["exc_type"] == "RuntimeError" and "in _run" in internal["traceback"]  # ...as type and frames,
    assert "deadbeef" not in h.log.getvalue()  # but an untyped exception's text may quote input: never logged (4802)
    wait_until(lambda: idle(h), 1)
    knobs.fail_at = None
    assert parse(h.client().post("/worker/execute", json={"prompt": "a", "params": {"max_tokens": 1}}).text)[-1][0] == "end"


def test_worker_stop_token_ids_end_generation(h: WorkerHarness) -> None:
    # 'c' is byte 99 -> token 102 in the fake's byte vocabulary
    with h.client().stream("POST", "/worker/execute", json={"prompt": "abcd", "params": {"max_tokens": 10, "stop_token_ids": [102]}}) as r:
        events = list(iter_events(r))
    assert [d["t"] for e, d in events if e == "token"] == ["a", "b", "c"]
    assert events[-1][1]["stop_reason"] == "eos"
    assert EOS not in [102]


def test_worker_m0_many_sequential_jobs_keep_one_slot(h: WorkerHarness, knobs: Knobs) -> None:
    knobs.step_s = 0.0
    results: list[int] = []

    def client_loop(token: str) -> None:
        c = h.client(token)
        for _ in range(6):
            r = c.post("/worker/execute", json={"prompt": "ab", "params": {"max_tokens": 3}})
            results.append(r.status_code)

    threads = [threading.Thread(target=client_loop, args=(t,)) for t in (TOKEN_A, TOKEN_B, TOKEN_A)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(results) <= {200, 503} and 200 in results
    assert knobs.max_active == 1
    wait_until(lambda: idle(h), 1)


def test_worker_sse_client_reads_only_complete_frames(h: WorkerHarness) -> None:
    # httpx as an ordinary client: the stream is plain text/event-stream any SSE client can read.
    with httpx.Client(base_url=h.url, headers={"Authorization": f"Bearer {TOKEN_A}"}) as c:
        r = c.post("/worker/execute", json={"prompt": "line1\nline2", "params": {"max_tokens": 11}})
    events = parse(r.text)
    assert "".join(d["t"] for e, d in events if e == "token") == "line1\nline2"  # newlines cannot break framing
