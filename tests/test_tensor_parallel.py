"""Tensor parallel on the CPU (gloo): real `worker-orcd serve` processes on the real Qwen2.5-Coder-0.5B.

Issue 12, "what the CPUs allow": a group of two processes (rank 0 serves HTTP/SSE, rank 1
follows) must give tp=1's greedy output on the reliable prefix (up to the first step where tp=1's
top-2 logit gap is <= TIE_GAP: tp=2 adds the partial sums in another order, so a near-tie may
flip); a process without the group secret is refused and never joins; cancel and drain on rank 0
reach rank 1; killing rank 1 mid-job fails the job with TP_GROUP_FAILED and stops rank 0 within
the collective timeout. Every process runs one torch thread (two cores, three processes).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from callback_server import CallbackServer
from test_serve_integration import Proc, start, wait_ready, write_tokens

pytestmark = pytest.mark.slow

PROMPT = "def fibonacci(n):"
N_GREEDY = 12
TIE_GAP = 0.1
TP_TIMEOUT = 10  # --tp-timeout-sec: how long a lost peer may take to be noticed
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _secret(tmp: Path, name: str, value: str) -> Path:
    path = tmp / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Group:
    rank0: Proc
    rank1: Proc
    pm: CallbackServer
    token: str
    tmp: Path


def _args(model: Path, rank: int, port: int, secret: Path, group: str, extra: list[str],
          device: tuple[str, ...] = ("--device", "cpu")) -> list[str]:
    return [
        "--worker-id", f"tp-w{rank}", *device, "--model", model.name, "--model-root", str(model.parent),
        "--tp-degree", "2", "--tp-rank", str(rank), "--tp-group-id", group, "--tp-members", "tp-w0,tp-w1",
        "--tp-master", f"127.0.0.1:{port}", "--tp-secret-file", str(secret), "--tp-timeout-sec", str(TP_TIMEOUT),
        "--max-batch", "2", "--kv-cache-size-mb", "64", "--max-tokens-out", "1500", "--shutdown-timeout-sec", "30",
        *extra,
    ]


def _start_group(tmp: Path, model: Path, pm: CallbackServer, token_file: Path, group: str,
                 intruder: bool = False) -> tuple[Proc, Proc, Proc | None]:
    port = _free_port()
    secret = _secret(tmp, f"{group}.secret", "group-secret-" + "7" * 24)
    rank0 = start(tmp, _args(model, 0, port, secret, group, ["--port", "0", "--callback-url", pm.url]), token_file,
                  env=ONE_THREAD)
    bad = None
    if intruder:  # same group id and member list, another secret: must be refused before rank 1 joins
        wrong = _secret(tmp, "wrong.secret", "not-the-secret-" + "3" * 24)
        bad = start(tmp, _args(model, 1, port, wrong, group, []), None, env=ONE_THREAD)
        assert bad.proc.wait(120) == 1, bad.log.read_text()[-3000:]
    rank1 = start(tmp, _args(model, 1, port, secret, group, []), None, env=ONE_THREAD)
    return rank0, rank1, bad


@pytest.fixture(scope="module")
def group(serve_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    tmp = tmp_path_factory.mktemp("tp")
    token_file, token, _ = write_tokens(tmp)
    with CallbackServer() as pm:
        rank0, rank1, bad = _start_group(tmp, serve_model_path, pm, token_file, "g-it", intruder=True)
        try:
            wait_ready(rank0, pm)
            g = Group(rank0, rank1, pm, token, tmp)
            g.intruder = bad  # type: ignore[attr-defined]
            yield g
        finally:
            for p in (rank0, rank1):
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait(30)


def _text(p: Proc) -> str:
    return p.log.read_text(errors="replace")


def _sse(c: httpx.Client, body: dict[str, Any], on_token: Any = None) -> list[tuple[str, dict[str, Any]]]:
    """Stream one job; ``on_token(index, headers)`` is called as tokens arrive."""
    out: list[tuple[str, dict[str, Any]]] = []
    with c.stream("POST", "/worker/execute", json=body) as r:
        assert r.status_code == 200, r.read()
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event is not None:
                data = json.loads(line[len("data: "):])
                out.append((event, data))
                if event == "token" and on_token is not None:
                    on_token(data["i"], r.headers)
    return out


@pytest.fixture(scope="module")
def reference(serve_model_path: Path) -> tuple[list[str], int]:
    """tp=1 in this process: the greedy tokens' texts and the reliable prefix length."""
    import torch

    from worker_orcd.engine.api import Engine, SamplingParams, TokenEvent
    from worker_orcd.loader import LoadOptions, validate_model
    from worker_orcd.residency import load_resident
    from worker_orcd.tokenizer import GGUFTokenizer

    torch.set_num_threads(1)
    v = validate_model(serve_model_path.name, LoadOptions(model_root=serve_model_path.parent))
    tok = GGUFTokenizer.from_gguf(v.gguf)
    m = load_resident(Engine.open("cpu"), v, kv_cache_mb=64)
    try:
        ids = tok.encode(PROMPT)
        got = [e.token_id for e in m.generate(ids, SamplingParams(max_tokens=N_GREEDY)) if isinstance(e, TokenEvent)]
        gaps = []
        for i in range(len(got)):
            top = m.runner.prefill_logits(ids + got[:i]).topk(2).values
            gaps.append(float(top[0] - top[1]))
    finally:
        m.close()
    n = next((i for i, g in enumerate(gaps) if g <= TIE_GAP), len(got))
    print(f"tp=1 greedy top-2 gaps {[round(g, 3) for g in gaps]}: reliable prefix {n} tokens")
    assert n >= 4, f"too few comparable tokens ({n}); pick a prompt without early near-ties"
    detok = tok.stream()
    return [detok.push(t) for t in got], n


def test_tp_wrong_secret_is_refused_and_never_joins(group: Group) -> None:
    bad = group.intruder  # type: ignore[attr-defined]
    assert "rank 0 refused rank 1" in _text(bad) and "TP_GROUP_FAILED" in _text(bad)
    assert "refused a join as rank 1" in _text(group.rank0)
    assert "rank 1 (tp-w1) joined" in _text(group.rank0)  # the real member, afterwards
    with group.rank0.client(group.token) as c:
        ready = c.get("/worker/ready").json()
    assert ready["ready"] and ready["nccl_group_id"] == "g-it"
    assert ready["handles"][0]["shard_index"] == 0 and ready["handles"][0]["total_shards"] == 2
    assert ready["handles"][0]["shard_id"] == "g-it-shard0of2"
    assert "g-it-shard1of2" in _text(group.rank1)  # rank 1 sealed its own shard


def test_tp2_greedy_equals_tp1_on_the_reliable_prefix(group: Group, reference: tuple[list[str], int]) -> None:
    want, n = reference
    with group.rank0.client(group.token) as c:
        events = _sse(c, {"prompt": PROMPT, "params": {"max_tokens": N_GREEDY, "temperature": 0}})
    assert events[-1][0] == "end", events[-1]
    got = [d["t"] for e, d in events if e == "token"]
    assert got[:n] == want[:n], f"tp=2 {got} vs tp=1 {want} (reliable prefix {n})"


def test_tp_cancel_on_rank0_stops_rank1(group: Group) -> None:
    job: dict[str, str] = {}
    started = threading.Event()

    def on_token(i: int, headers: Any) -> None:
        job["id"] = headers["x-job-id"]
        if i >= 2:
            started.set()

    result: list[Any] = []
    with group.rank0.client(group.token) as c:
        t = threading.Thread(target=lambda: result.append(
            _sse(c, {"prompt": PROMPT, "params": {"max_tokens": 1000, "temperature": 0}}, on_token)))
        t.start()
        assert started.wait(120), "the long job never produced tokens"
        idle_before = _text(group.rank1).count("idle after")
        r = c.post("/cancel", json={"job_id": job["id"]})
        assert r.status_code == 202, r.text
        t.join(60)
    assert not t.is_alive() and result and result[0][-1][0] == "error"
    assert result[0][-1][1]["code"] == "CANCELLED"
    deadline = time.monotonic() + 30  # rank 1 gets no step for the cancelled job: it goes idle
    while _text(group.rank1).count("idle after") <= idle_before:
        assert time.monotonic() < deadline, "rank 1 kept running steps after the cancel on rank 0"
        time.sleep(0.2)


def test_tp_drain_on_rank0_ends_rank1(group: Group) -> None:
    with group.rank0.client(group.token) as c:
        assert c.post("/shutdown").status_code in (200, 202)
    assert group.rank0.proc.wait(60) == 0, _text(group.rank0)[-3000:]
    assert group.rank1.proc.wait(60) == 0, _text(group.rank1)[-3000:]
    assert "rank 0 ended the group" in _text(group.rank1)


def test_tp_killing_rank1_mid_job_fails_the_job_and_stops_rank0(
    serve_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("tp-kill")
    token_file, token, _ = write_tokens(tmp)
    with CallbackServer() as pm:
        rank0, rank1, _ = _start_group(tmp, serve_model_path, pm, token_file, "g-kill")
        try:
            wait_ready(rank0, pm)
            killed = threading.Event()

            def on_token(i: int, headers: Any) -> None:
                if i == 2 and not killed.is_set():
                    os.kill(rank1.proc.pid, signal.SIGKILL)
                    killed.set()

            t0 = time.monotonic()
            with rank0.client(token) as c:
                events = _sse(c, {"prompt": PROMPT, "params": {"max_tokens": 1000, "temperature": 0}}, on_token)
            assert killed.is_set()
            assert events[-1][0] == "error" and events[-1][1]["code"] == "TP_GROUP_FAILED", events[-3:]
            assert "lost a member" in events[-1][1]["message"]
            assert time.monotonic() - t0 < 2 * TP_TIMEOUT + 60
            assert rank0.proc.wait(60) == 1, _text(rank0)[-3000:]  # stopped, exit 1 for the supervisor
            assert '"state": "stopped"' in _text(rank0) or '"state":"stopped"' in _text(rank0)
        finally:
            for p in (rank0, rank1):
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait(30)


def test_tp_rank0_takes_its_shard_from_a_commit(serve_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Rank 0 started without --model: POST /worker/commit of shard 0 of 2 loads it, joining rank 1 (README)."""
    tmp = tmp_path_factory.mktemp("tp-commit")
    token_file, token, _ = write_tokens(tmp)
    port = _free_port()
    secret = _secret(tmp, "g-c.secret", "group-secret-" + "5" * 24)
    with CallbackServer() as pm:
        args0 = _args(serve_model_path, 0, port, secret, "g-c", ["--port", "0", "--callback-url", pm.url])
        i = args0.index("--model")
        del args0[i:i + 2]
        rank0 = start(tmp, args0, token_file, env=ONE_THREAD)
        rank1 = start(tmp, _args(serve_model_path, 1, port, secret, "g-c", []), None, env=ONE_THREAD)
        try:
            deadline = time.monotonic() + 120
            while (listen := next((r for r in rank0.lines() if r.get("event") == "listening"), None)) is None:
                assert time.monotonic() < deadline and rank0.proc.poll() is None, _text(rank0)[-3000:]
                time.sleep(0.2)
            rank0.url = f"http://127.0.0.1:{listen['port']}"
            with rank0.client(token, timeout=600) as c:
                wrong = c.post("/worker/commit", json={"model_ref": serve_model_path.name, "shard_index": 1,
                                                       "total_shards": 2})
                assert wrong.status_code == 400 and wrong.json()["message"].startswith("shard_index: "), wrong.text
                ok = c.post("/worker/commit", json={"model_ref": serve_model_path.name, "shard_index": 0,
                                                    "total_shards": 2})
                assert ok.status_code == 200, ok.text + _text(rank0)[-3000:]
                assert ok.json()["handle"]["shard_id"] == "g-c-shard0of2"
                for _ in range(300):  # ready once the commit's follow-up (callback, engine loop) has run
                    if c.get("/worker/ready").json()["ready"]:
                        break
                    time.sleep(0.1)
                events = _sse(c, {"prompt": PROMPT, "params": {"max_tokens": 4}})
                assert [e for e, _ in events][-1] == "end", events
            assert any(r.get("event") == "tp_member_ready" for r in rank1.lines()), _text(rank1)[-3000:]
        finally:
            for p in (rank0, rank1):
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait(30)
