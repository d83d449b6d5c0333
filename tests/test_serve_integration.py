"""End to end: `worker-orcd serve` as a real process on the real Qwen2.5-Coder-0.5B, over HTTP/SSE.

Runs in CPU development mode here (``--device cpu``) and on a real GPU with
REQUIRE_REAL_GPU=1 (``--device cuda``): the ``device`` fixture picks. A small
real HTTP server (tests/callback_server.py) plays the pool manager.

Generation on a loaded 2-core CPU is slow (~10-30 tokens/s), so requests are
short and every wait is generous. The process with the model is started once
for the module; the SIGTERM test ends it, then a second process serves the
timeout test, and bare processes (no model) cover commit and startup errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from callback_server import READY_PATH, STATUS_PATH, CallbackServer, Received
from prometheus_client.parser import text_string_to_metric_families
from proof_bundle import ProofBundle

from worker_orcd.http.sse import parse

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 900  # model load on a shared 2-core CPU; seconds on a GPU
REQUEST_TIMEOUT = 300
PROMPT = "def fibonacci(n):"


def serve_command() -> list[str]:
    """`python -m worker_orcd serve` once cli.py routes it; the module entry point until then."""
    from worker_orcd import cli
    from worker_orcd.serve import add_serve_parser

    if add_serve_parser in cli.SUBCOMMANDS:
        return [sys.executable, "-m", "worker_orcd", "serve"]
    return [sys.executable, "-m", "worker_orcd.serve"]


# Jobs the tests cancel or overlap: long enough to still be running on a GPU (~900 tok/s) when the
# second request or the cancel arrives; they never run to the end.
LONG_JOB = 1500

@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str | None = None
    ready: Received | None = None
    ready_s: float = 0.0  # process start -> readiness callback
    early_health: tuple[int, dict[str, Any]] | None = None  # GET /health as soon as `listening` was logged

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "non-json", "human": line})
        return out

    def client(self, token: str | None, timeout: float = REQUEST_TIMEOUT) -> httpx.Client:
        assert self.url is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def start(tmp: Path, args: list[str], token_file: Path | None, env: dict[str, str] | None = None) -> Proc:
    log = tmp / f"worker-{secrets.token_hex(4)}.log"
    cmd = serve_command() + args + (["--api-token-file", str(token_file)] if token_file else [])
    if os.geteuid() == 0:  # CI runs as root: these tests are not about the privilege drop (test_privileges.py)
        cmd.append("--allow-root")
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return Proc(proc, log)


def write_tokens(tmp: Path) -> tuple[Path, str, str]:
    a, b = secrets.token_hex(24), secrets.token_hex(24)
    path = tmp / "token"
    path.write_text(f"{a}\n{b}\n")
    path.chmod(0o600)
    return path, a, b


def wait_ready(p: Proc, pm: CallbackServer, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pm.of(READY_PATH)
        if got:
            p.ready = got[0]
            p.url = str(got[0].body["uri"])
            break
        if p.proc.poll() is not None:
            raise AssertionError(f"worker exited {p.proc.returncode} during startup:\n{p.log.read_text()[-3000:]}")
        time.sleep(0.2)
    else:
        raise AssertionError(f"no readiness callback within {timeout} s:\n{p.log.read_text()[-3000:]}")
    with p.client(None, timeout=30) as c:  # accept work only after the callback: wait for `ready`
        for _ in range(300):
            if c.get("/health").json()["state"] == "ready":
                return
            time.sleep(0.1)
    raise AssertionError("worker never reached state ready after its callback")


@dataclass
class Served:
    p: Proc
    pm: CallbackServer
    token: str
    token_b: str
    model_path: Path


@pytest.fixture(scope="module")
def served(serve_model_path: Path, device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    token_file, a, b = write_tokens(tmp)
    with CallbackServer() as pm:
        p = start(tmp, [
            "--worker-id", "it-worker", "--device", device, "--model", serve_model_path.name,
            "--model-root", str(serve_model_path.parent), "--port", "0", "--callback-url", pm.url,
            "--max-prompt-chars", "2000", "--max-tokens-out", str(LONG_JOB), "--max-tokens-in", "64",
            "--inference-timeout-sec", "240", "--shutdown-timeout-sec", "60", "--sse-keepalive-sec", "0.5",
            "--log-level", "debug",  # the redaction test greps every line the worker can write
            "--max-batch", "1",  # slots_total=1: M0's one job at a time (test_serve_batching.py runs the batched mode)
        ], token_file)
        t0 = time.monotonic()
        try:
            p.early_health = _health_once_listening(p)
            wait_ready(p, pm)
            p.ready_s = time.monotonic() - t0
            yield Served(p, pm, a, b, serve_model_path)
        finally:
            if p.proc.poll() is None:
                p.stop()


def _health_once_listening(p: Proc, timeout: float = STARTUP_TIMEOUT) -> tuple[int, dict[str, Any]]:
    """The port (from the `listening` line) probed at once: with --model that is while the model loads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        port = next((rec["port"] for rec in p.lines() if rec.get("event") == "listening"), None)
        if port is not None:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
            return r.status_code, r.json()
        if p.proc.poll() is not None:
            raise AssertionError(f"worker exited {p.proc.returncode} before listening:\n{p.log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("worker never logged `listening`")


def stream(served: Served, body: dict[str, Any], token: str | None = None) -> list[tuple[str, Any]]:
    with served.p.client(token or served.token) as c:
        r = c.post("/worker/execute", json=body)
    assert r.status_code == 200, r.text
    return parse(r.text)


def wait_state(p: Proc, state: str, timeout: float) -> float:
    t0 = time.monotonic()
    with p.client(None, timeout=10) as c:
        while c.get("/health").json()["state"] != state:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"worker not {state} within {timeout} s")
            time.sleep(0.02)
    return time.monotonic() - t0


# --- startup and callback -------------------------------------------------------------------


def test_worker_4023_readiness_callback_after_listening(served: Served, device: str) -> None:
    ready = served.p.ready
    assert ready is not None
    body = ready.body
    assert {"worker_id", "model_ref", "vram_bytes", "uri", "ecp"} <= set(body)
    assert body["worker_id"] == "it-worker" and body["model_ref"] == served.model_path.name
    assert body["ecp"]["worker_id"] == "it-worker" and "qwen2" in body["ecp"]["supports_architecture"]
    assert body["handle"]["sealed"] is True
    assert body["handle"]["digest"] == hashlib.sha256(served.model_path.read_bytes()).hexdigest()
    # The pool manager could reach /health while handling the callback: the server listened first.
    assert ready.health_status == 200 and ready.health_body is not None
    assert ready.health_body["state"] == "loading"  # ...and it did not accept work before the callback
    if device == "cpu":  # SPEC "GPU only": the dev mode is announced and claims no VRAM
        assert body["dev_mode"] is True and body["vram_bytes"] == 0
        assert any(rec.get("event") == "dev_mode" for rec in served.p.lines())
    else:
        assert body["dev_mode"] is False and body["vram_bytes"] > 0
    events = [rec.get("event") for rec in served.p.lines()]
    # Issue 13: the port opens first and the model loads while /health answers 503 "loading".
    assert events.index("listening") < events.index("model_load") < events.index("sealed") < events.index("ready")
    assert served.p.early_health is not None
    status, health = served.p.early_health
    if device == "cpu" or status == 503:  # hashing + uploading the 0.5B takes seconds on the CPU
        assert status == 503 and health["status"] == "loading" and health["state"] == "loading", health
        assert health["progress"]["phase"] in ("validate", "upload", "capture", "seal"), health


def test_worker_4200_auth_required_health_open(served: Served) -> None:
    with served.p.client(None) as anon:
        h = anon.get("/health")
        assert h.status_code == 200 and h.json()["state"] == "ready" and h.json()["model"] == served.model_path.name
        r = anon.post("/worker/execute", json={"prompt": PROMPT})
        assert r.status_code == 401 and r.json()["code"] == "AUTH_FAILED" and r.headers["www-authenticate"].startswith("Bearer")
    with served.p.client("not-the-token-" + "x" * 20) as wrong:
        r = wrong.post("/worker/execute", json={"prompt": PROMPT})
        assert r.status_code == 401 and r.json()["code"] == "AUTH_FAILED"
        assert wrong.get("/worker/ready").status_code == 401
    with served.p.client(served.token) as ok:
        ready = ok.get("/worker/ready").json()
        assert ready["ready"] is True and ready["handles"][0]["sealed"] is True


# --- streaming -------------------------------------------------------------------------------


def test_worker_4246_sse_order_shapes_and_greedy_equals_engine(served: Served, device: str, proof_bundle: ProofBundle) -> None:
    t0 = time.monotonic()
    events = stream(served, {"prompt": PROMPT, "params": {"max_tokens": 8, "temperature": 0.0}})
    proof_bundle.timing("served-request", time.monotonic() - t0, device=device)
    names = [e for e, _ in events]
    assert names[0] == "started" and names[-1] == "end" and set(names[1:-1]) <= {"token", "metrics"}
    assert names.count("token") == events[-1][1]["tokens_out"] <= 8
    started = events[0][1]
    assert set(started) == {"job_id", "model", "started_at", "correlation_id"} and started["model"] == served.model_path.name
    tokens = [d for e, d in events if e == "token"]
    assert [t["i"] for t in tokens] == list(range(len(tokens))) and all(set(t) == {"t", "i"} for t in tokens)
    end = events[-1][1]
    assert {"tokens_in", "tokens_out", "decode_time_ms", "ttft_ms", "stop_reason"} <= set(end)
    text = "".join(t["t"] for t in tokens) + end.get("tail", "")

    # The same request run directly on the engine, in this process, must give the same text.
    from worker_orcd.engine.api import Engine, SamplingParams
    from worker_orcd.loader import LoadOptions, validate_model
    from worker_orcd.residency import load_resident
    from worker_orcd.tokenizer import GGUFTokenizer

    validated = validate_model(served.model_path.name, LoadOptions(model_root=served.model_path.parent))
    tok = GGUFTokenizer.from_gguf(validated.gguf)
    engine = Engine.open(device, 0)
    try:
        model = load_resident(engine, validated)
        ids = tok.encode(PROMPT)
        out = [e.token_id for e in model.generate(ids, SamplingParams(max_tokens=8, stop_ids=tok.eos_ids)) if hasattr(e, "token_id")]
    finally:
        engine.close()
    proof_bundle.token_stream("greedy-served", [t["t"] for t in tokens], params={"max_tokens": 8, "temperature": 0.0},
                              text=text, prompt=PROMPT, device=device)
    proof_bundle.token_stream("greedy-engine", out, params={"max_tokens": 8, "temperature": 0.0}, prompt=list(ids),
                              text=tok.decode(out, skip_special=True), device=device)
    assert end["tokens_in"] == len(ids)
    assert text == tok.decode(out, skip_special=True)
    assert len(out) == end["tokens_out"]


def test_worker_4710_same_seed_twice_identical_stream(served: Served, device: str, proof_bundle: ProofBundle) -> None:
    body: dict[str, Any] = {"prompt": PROMPT, "params": {"max_tokens": 6, "temperature": 0.9, "top_k": 40, "seed": 1234567890123}}
    assert served.p.ready is not None
    proof_bundle.model_digest("model", sha256=served.p.ready.body["handle"]["digest"], file=served.model_path.name,
                              device=device)
    runs = []
    for i in range(2):
        t0 = time.monotonic()
        events = stream(served, body)
        runs.append(events)
        end = events[-1][1]
        proof_bundle.token_stream(
            f"run-{i + 1}", [d["t"] for e, d in events if e == "token"], seed=body["params"]["seed"], params=body["params"],
            prompt=PROMPT, text="".join(d["t"] for e, d in events if e == "token") + end.get("tail", ""), end=end,
        )
        proof_bundle.timing(f"run-{i + 1}", time.monotonic() - t0, ttft_ms=end.get("ttft_ms"),
                            decode_time_ms=end.get("decode_time_ms"))

    def tokens(events: list[tuple[str, Any]]) -> list[tuple[str, int]]:
        return [(d["t"], d["i"]) for e, d in events if e == "token"]

    assert tokens(runs[0]) == tokens(runs[1]) and tokens(runs[0])


def test_worker_m0_concurrent_execute_busy_with_retry_after(served: Served) -> None:
    with served.p.client(served.token) as c, c.stream(
        "POST", "/worker/execute", json={"prompt": PROMPT, "params": {"max_tokens": LONG_JOB}, "job_id": "it-busy"}
    ) as r:
        lines = r.iter_lines()
        assert next(lines) == "event: started"
        with served.p.client(served.token_b) as other:
            busy = other.post("/worker/execute", json={"prompt": "x", "params": {"max_tokens": 1}})
        assert busy.status_code == 503 and busy.json()["code"] == "WORKER_BUSY" and busy.json()["retriable"] is True
        assert busy.json()["retry_after_ms"] > 0 and int(busy.headers["retry-after"]) >= 1
        assert c.post("/cancel", json={"job_id": "it-busy"}).status_code == 202  # don't wait for the whole job
        rest = "\n".join(lines)
    assert "event: error" in rest
    wait_state(served.p, "ready", 30)


def test_worker_4252_cancel_mid_stream(served: Served) -> None:
    got: list[tuple[str, Any]] = []
    with served.p.client(served.token) as c, c.stream(
        "POST", "/worker/execute", json={"prompt": PROMPT, "params": {"max_tokens": LONG_JOB}, "job_id": "it-cancel"}
    ) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                got.append((event or "", json.loads(line[6:])))
                if sum(1 for e, _ in got if e == "token") == 2 and not any(e == "ack" for e, _ in got):
                    ack = c.post("/cancel", json={"job_id": "it-cancel"})
                    assert ack.status_code == 202
                    got.append(("ack", ack.json()))
    ack_body = next(d for e, d in got if e == "ack")
    tokens = [d for e, d in got if e == "token"]
    # No token after the acknowledgement: the stream holds exactly what was sent before it.
    assert len(tokens) == ack_body["tokens_sent"] and len(tokens) < 64
    assert got[-1][0] == "error" and got[-1][1]["code"] == "CANCELLED"
    wait_state(served.p, "ready", 10)  # the slot is free again
    with served.p.client(served.token) as c:
        assert c.post("/cancel", json={"job_id": "it-cancel"}).json() == ack_body  # idempotent after the end
        assert c.post("/cancel", json={"job_id": "it-cancel"}, headers={"Authorization": f"Bearer {served.token_b}"}).status_code == 403


def test_worker_disconnect_mid_stream_frees_slot_within_a_second(served: Served) -> None:
    assert served.p.url is not None
    u = urlsplit(served.p.url)
    body = json.dumps({"prompt": PROMPT, "params": {"max_tokens": LONG_JOB}}).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=REQUEST_TIMEOUT)
    sock.sendall(
        b"POST /worker/execute HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {served.token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    seen = b""
    while b"event: token" not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    sock.close()
    assert wait_state(served.p, "ready", 5) < 1.0
    with served.p.client(served.token) as c:
        assert c.post("/worker/execute", json={"prompt": "x", "params": {"max_tokens": 1}}).status_code == 200


def test_worker_m0_end_is_sent_only_after_the_slot_is_free(served: Served) -> None:
    """Issue 10, defect 4, where it can show (one job at a time): each request sent right after the previous
    `end` frame never meets WORKER_BUSY — the job is accounted finished before its `end` leaves."""
    with served.p.client(served.token) as c:
        for i in range(60):
            r = c.post("/worker/execute", json={"prompt": "x", "params": {"max_tokens": 1}})
            assert r.status_code == 200 and parse(r.text)[-1][0] == "end", (i, r.status_code, r.text[-300:])


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a\u0000b"}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": "word " * 300}, "prompt"),  # under 2000 characters, over --max-tokens-in 64
        ({"prompt": "", "params": {}}, "prompt"),
        ({"prompt": PROMPT, "params": {"max_tokens": LONG_JOB + 1}}, "params.max_tokens"),
        ({"prompt": PROMPT, "params": {"temperature": 2.01}}, "params.temperature"),
        ({"prompt": PROMPT, "params": {"seed": 2**64}}, "params.seed"),
        ({"prompt": PROMPT, "params": {"seed": -1}}, "params.seed"),
        ({"prompt": PROMPT, "stream": True}, "stream"),
    ],
)
def test_worker_4300_each_validation_error(served: Served, body: dict[str, Any], field: str) -> None:
    with served.p.client(served.token) as c:
        r = c.post("/worker/execute", json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["code"] == "INVALID_PARAMS" and err["message"].startswith(f"{field}: ") and err["retriable"] is False


def test_worker_4022_second_different_commit_refused(served: Served) -> None:
    with served.p.client(served.token) as c:
        r = c.post("/worker/commit", json={"model_ref": "other.gguf", "expected_digest": "0" * 64})
    assert r.status_code == 422 and r.json()["code"] == "MODEL_LOAD_FAILED" and "4022" in r.json()["message"]


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(c: httpx.Client) -> Scrape:
    out: Scrape = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def moved(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_worker_4811_metrics_exact_deltas_after_real_requests(served: Served, device: str) -> None:
    """One cancelled job, one busy refusal, one invalid request, one completed job: every series moves exactly."""
    polls = 0

    def until_ready(c: httpx.Client) -> None:
        nonlocal polls
        for _ in range(3000):
            polls += 1
            if c.get("/health").json()["state"] == "ready":
                return
            time.sleep(0.01)
        raise AssertionError("worker did not return to ready")

    with served.p.client(None) as anon, served.p.client(served.token) as c:
        before = scrape(anon)
        cancelled: list[tuple[str, Any]] = []
        with c.stream("POST", "/worker/execute", json={"prompt": PROMPT, "params": {"max_tokens": LONG_JOB}, "job_id": "it-metrics"}) as r:
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    cancelled.append((event or "", json.loads(line[6:])))
                    if event == "token" and sum(1 for e, _ in cancelled if e == "token") == 2:
                        with served.p.client(served.token_b) as other:
                            busy = other.post("/worker/execute", json={"prompt": "x", "params": {"max_tokens": 1}})
                        assert busy.status_code == 503 and busy.json()["code"] == "WORKER_BUSY"
                        assert c.post("/cancel", json={"job_id": "it-metrics"}).status_code == 202
        assert cancelled[-1][0] == "error" and cancelled[-1][1]["code"] == "CANCELLED"
        n_cancelled = sum(1 for e, _ in cancelled if e == "token")
        until_ready(anon)
        assert c.post("/worker/execute", json={"prompt": PROMPT, "params": {"temperature": 3}}).status_code == 400
        done = parse(c.post("/worker/execute", json={"prompt": PROMPT, "params": {"max_tokens": 3}}).text)
        end = done[-1][1]
        assert done[-1][0] == "end" and end["tokens_out"] == 3
        until_ready(anon)
        after = scrape(anon)
        vram = anon.get("/health").json()["vram_bytes"]

    assert moved(after, before, "worker_requests_total", outcome="success") == 1 + 1 + 1 + polls  # scrape, cancel, job, polls
    for code in ("CANCELLED", "WORKER_BUSY", "INVALID_PARAMS"):
        assert moved(after, before, "worker_requests_total", outcome=code) == 1, code
    assert moved(after, before, "worker_jobs_started_total") == 2
    assert moved(after, before, "worker_jobs_completed_total") == 1
    assert moved(after, before, "worker_jobs_failed_total", code="CANCELLED") == 1
    assert moved(after, before, "worker_tokens_in_total") == 2 * end["tokens_in"]
    assert moved(after, before, "worker_tokens_generated_total") == n_cancelled + 3
    assert moved(after, before, "worker_time_to_first_token_ms_count") == 2
    assert moved(after, before, "worker_inter_token_latency_ms_count") == (n_cancelled - 1) + (3 - 1)
    assert moved(after, before, "worker_inference_duration_ms_count") == 2
    assert moved(after, before, "worker_seal_verify_ms_count") == 2
    assert moved(after, before, "worker_seal_verify_ms_sum") > 0
    assert moved(after, before, "worker_cuda_errors_total") == 0
    assert after[("worker_state", (("state", "ready"),))] == 1 and after[("worker_state", (("state", "executing"),))] == 0
    assert after[("worker_uptime_seconds", ())] > before[("worker_uptime_seconds", ())] > 0
    assert after[("worker_vram_bytes", ())] == vram and (vram == 0) == (device == "cpu")


# --- logs (4800-4802) ---------------------------------------------------------------------


def test_worker_4802_no_prompt_output_or_token_in_any_log_line(served: Served) -> None:
    """Debug level, a unique marker in the prompt, a known token: grep every line the process wrote."""
    marker = "ZQX" + secrets.token_hex(8)
    prompt = f"# {marker}\n{PROMPT}"
    cid = "redact-" + secrets.token_hex(4)
    with served.p.client(served.token) as c:
        r = c.post("/worker/execute", json={"prompt": prompt, "params": {"max_tokens": 8}}, headers={"X-Correlation-Id": cid})
    assert r.status_code == 200 and r.headers["x-correlation-id"] == cid
    events = parse(r.text)
    assert events[0][1]["correlation_id"] == cid and events[-1][0] == "end"
    generated = "".join(d["t"] for e, d in events if e == "token") + events[-1][1].get("tail", "")
    deadline = time.monotonic() + 30
    while not any(rec.get("event") == "http_request" and rec.get("correlation_id") == cid for rec in served.p.lines()):
        assert time.monotonic() < deadline, "the request's log line never appeared"
        time.sleep(0.05)

    needles = {
        "marker": marker, "prompt": PROMPT, "token": served.token, "other token": served.token_b,
        "token sha256": hashlib.sha256(served.token.encode()).hexdigest(),
        "other token sha256": hashlib.sha256(served.token_b.encode()).hexdigest(),
    }
    if len(generated.strip()) >= 6:  # long enough not to occur in a sentence by chance
        needles["generated text"] = generated
    raw = served.p.log.read_text(errors="replace")
    for what, needle in needles.items():
        for form in {needle, json.dumps(needle, ensure_ascii=False)[1:-1], json.dumps(needle)[1:-1]}:
            assert form not in raw, f"{what} found in the worker log"
    records = served.p.lines()
    assert all(rec.get("event") != "non-json" for rec in records), [r for r in records if r.get("event") == "non-json"][:3]
    assert any(rec["level"] == "debug" for rec in records)  # the grep ran over debug output too
    mine = [rec for rec in records if rec.get("correlation_id") == cid]
    assert {"execute_start", "execute_end", "http_request"} <= {rec["event"] for rec in mine}
    start = next(rec for rec in mine if rec["event"] == "execute_start")
    assert start["fp6"] == hashlib.sha256(served.token.encode()).hexdigest()[:6]
    assert start["tokens_in"] == events[-1][1]["tokens_in"] and start["model_ref"] == served.model_path.name
    assert all({"ts", "level", "event", "human", "worker_id", "gpu_device"} <= set(rec) for rec in records)


# --- shutdown (ends the served process: keep it the last test using `served`) -------------


def test_worker_4970_sigterm_during_job_exits_0_within_timeout(served: Served) -> None:
    p = served.p
    with p.client(served.token) as c, c.stream("POST", "/worker/execute", json={"prompt": PROMPT, "params": {"max_tokens": 12}}) as r:
        lines = r.iter_lines()
        while next(lines) != "event: token":
            pass
        p.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rest = "\n".join(lines)
    code = p.proc.wait(70)
    elapsed = time.monotonic() - t0
    assert code == 0 and elapsed < 60  # --shutdown-timeout-sec 60
    assert "event: end" in rest or '"code":"CANCELLED"' in rest  # finished, or cancelled at the deadline
    events = [rec.get("event") for rec in p.lines()]
    assert "draining" in events and events[-1] == "shutdown"
    assert not any(rec.get("level") == "error" for rec in p.lines())


# --- timeout (own process: needs a short --inference-timeout-sec) ---------------------------


def test_worker_4420_inference_timeout(serve_model_path: Path, device: str, tmp_path: Path) -> None:
    token_file, a, _ = write_tokens(tmp_path)
    with CallbackServer() as pm:
        p = start(tmp_path, [
            "--worker-id", "it-timeout", "--device", device, "--model", serve_model_path.name,
            "--model-root", str(serve_model_path.parent), "--port", "0", "--callback-url", pm.url,
            "--inference-timeout-sec", "1", "--max-tokens-out", "4000",
        ], token_file)
        try:
            wait_ready(p, pm)
            t0 = time.monotonic()
            with p.client(a) as c:
                r = c.post("/worker/execute", json={"prompt": PROMPT, "params": {"max_tokens": 4000}})
            events = parse(r.text)
            assert events[-1][0] == "error" and events[-1][1]["code"] == "INFERENCE_TIMEOUT", events[-1]
            assert events[-1][1]["retriable"] is True and time.monotonic() - t0 < 60
            wait_state(p, "ready", 10)
        finally:
            assert p.stop() == 0


# --- the engine process (--engine-process on, the default) ---------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_worker_engine_process_death_fails_the_job_and_stops_the_worker(
    serve_model_path: Path, device: str, tmp_path: Path
) -> None:
    token_file, a, _ = write_tokens(tmp_path)
    with CallbackServer() as pm:
        p = start(tmp_path, [
            "--worker-id", "it-engine-proc", "--device", device, "--model", serve_model_path.name,
            "--model-root", str(serve_model_path.parent), "--port", "0", "--callback-url", pm.url,
            "--max-tokens-out", "4000", "--event-loop", "uvloop",
        ], token_file)
        try:
            wait_ready(p, pm)
            (child,) = _children(p.proc.pid)  # the engine process; the worker itself never maps torch
            assert "libtorch" not in Path(f"/proc/{p.proc.pid}/maps").read_text()
            assert "libtorch" in Path(f"/proc/{child}/maps").read_text()
            # the worker's event loop is uvloop's (--event-loop uvloop): its extension module is mapped
            assert "uvloop/loop." in Path(f"/proc/{p.proc.pid}/maps").read_text()
            with p.client(a) as c, c.stream("POST", "/worker/execute",
                                            json={"prompt": PROMPT, "params": {"max_tokens": 4000}}) as r:
                lines = r.iter_lines()
                while next(lines) != "event: token":
                    pass
                os.kill(child, signal.SIGKILL)  # as the OOM killer would
                rest = "\n".join(lines)
            assert '"code":"INTERNAL"' in rest.replace(" ", "")  # the stream ends in an error, never hangs
            assert p.proc.wait(60) != 0  # fatal: the worker stops (its supervisor restarts it)
            assert any(rec.get("level") == "error" and rec.get("logger") == "worker_orcd.engine_process"
                       and "exited unexpectedly" in rec.get("human", "") for rec in p.lines())
        finally:
            if p.proc.poll() is None:
                p.stop()


# --- commit with a wrong digest, startup failures (bare processes) --------------------------


def test_worker_4223_commit_with_wrong_digest_refused(serve_model_path: Path, device: str, tmp_path: Path) -> None:
    token_file, a, _ = write_tokens(tmp_path)
    port = _free_port()
    p = start(tmp_path, [
        "--worker-id", "it-commit", "--device", device, "--model-root", str(serve_model_path.parent), "--port", str(port),
    ], token_file)
    p.url = f"http://127.0.0.1:{port}"
    try:
        _wait_listening(p)
        with p.client(a) as c:
            assert c.get("/worker/ready").json()["ready"] is False
            assert c.post("/worker/execute", json={"prompt": PROMPT}).json()["code"] == "WORKER_NOT_READY"
            r = c.post("/worker/commit", json={"model_ref": serve_model_path.name, "expected_digest": "ab" * 32})
            assert r.status_code == 422 and r.json()["code"] == "MODEL_LOAD_FAILED"
            assert "sha-256 mismatch" in r.json()["message"].lower()
            assert c.get("/health").json()["state"] == "starting"
    finally:
        assert p.stop() == 0


def test_worker_4913_startup_fails_without_token_file(tmp_path: Path) -> None:
    with CallbackServer() as pm:
        p = start(tmp_path, ["--worker-id", "w", "--device", "cpu", "--callback-url", pm.url,
                             "--api-token-file", str(tmp_path / "absent")], None)
        assert p.proc.wait(120) == 1
        (status,) = pm.wait_for(STATUS_PATH, timeout=5)
    assert status.body["error"]["code"] == "AUTH_FAILED"
    failed = [rec for rec in p.lines() if rec.get("event") == "startup_failed"]
    assert len(failed) == 1 and str(tmp_path / "absent") in failed[0]["human"]
    assert not any(rec.get("event") == "device_open" for rec in p.lines())  # failed fast, before the device


def test_worker_4983_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    p = start(tmp_path, ["--worker-id", "w", "--port", "70000"], None)
    assert p.proc.wait(120) == 2
    out = p.log.read_text().strip().splitlines()
    assert out == ["worker-orcd: error: config: port (--port): Input should be less than or equal to 65535 (got '70000')"]


def test_worker_4340_model_outside_root_fails_startup(tmp_path: Path, device: str) -> None:
    token_file, _, _ = write_tokens(tmp_path)
    root = tmp_path / "models"
    root.mkdir()
    with CallbackServer() as pm:
        p = start(tmp_path, ["--worker-id", "w", "--device", device, "--model", "/etc/hostname",
                             "--model-root", str(root), "--callback-url", pm.url], token_file)
        assert p.proc.wait(300) == 1
        (status,) = pm.wait_for(STATUS_PATH, timeout=5)
    assert status.body["error"]["code"] == "MODEL_LOAD_FAILED"
    assert "outside the model root" in status.body["error"]["message"]
    assert any(rec.get("event") == "startup_failed" and "outside the model root" in rec["human"] for rec in p.lines())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(p: Proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise AssertionError(f"worker exited {p.proc.returncode}:\n{p.log.read_text()[-3000:]}")
        try:
            with p.client(None, timeout=2) as c:
                c.get("/health")
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("worker never listened")
