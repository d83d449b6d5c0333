"""Lifecycle against a real server (fake engine): callbacks, commit, seal failure, shutdown, startup failures.

SPEC 4020-4031, 4220-4227, 4122, 4960-4972, "Callback".
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from callback_server import READY_PATH, STATUS_PATH, CallbackServer
from test_http_fakes import MODEL_NAME, TOKEN_A, Knobs, WorkerHarness, iter_events

from worker_orcd.errors import ErrorCode, WorkerError
from worker_orcd.http.sse import parse


def execute(h: WorkerHarness, max_tokens: int = 2) -> httpx.Response:
    return h.client().post("/worker/execute", json={"prompt": "abc", "params": {"max_tokens": max_tokens}})


# --- readiness callback ("Callback", 4023) --------------------------------------------------


def test_worker_4023_callback_after_listening_and_work_only_after_it(tmp_path: Path) -> None:
    with CallbackServer(script={READY_PATH: [503, 503]}) as pm:
        with WorkerHarness(tmp_path, callback_url=pm.url, callback_attempts=4, wait_ready=False) as h:
            # While the callback is being retried (>= 0.375 s of backoff) the worker listens but refuses work.
            pm.wait_for(READY_PATH, timeout=10, count=1)
            r = execute(h)
            assert r.status_code == 503 and r.json()["code"] == "WORKER_NOT_READY", r.text
            assert h.worker is not None and h.worker.state.value == "loading"
            attempts = pm.wait_for(READY_PATH, timeout=10, count=3)
            for _ in range(200):
                if h.worker is not None and h.worker.state.value == "ready":
                    break
                time.sleep(0.02)
            assert h.worker is not None and h.worker.state.value == "ready"
            body = attempts[-1].body
            assert set(body) >= {"worker_id", "model_ref", "vram_bytes", "uri", "ecp"}
            assert body["worker_id"] == "w-test" and body["model_ref"] == MODEL_NAME and body["uri"] == h.url
            assert body["dev_mode"] is True and body["device"] == "cpu" and body["vram_bytes"] == 0
            assert body["ecp"]["worker_id"] == "w-test" and "rope_llama" in body["ecp"]["supports_positional"]
            assert body["handle"]["sealed"] is True
            # Listening before the callback: the pool manager reached /health while handling it.
            assert all(a.health_status == 200 for a in attempts)
            assert attempts[0].health_body is not None and attempts[0].health_body["state"] == "loading"
            assert execute(h).status_code == 200
        assert h.exit_code == 0


def test_worker_callback_refused_exits_nonzero_with_status_callback(tmp_path: Path) -> None:
    with CallbackServer(script={READY_PATH: [404]}) as pm:
        with WorkerHarness(tmp_path, callback_url=pm.url, callback_attempts=3) as h:
            assert h.join(10) == 1
        assert len(pm.of(READY_PATH)) == 1  # a 4xx is final: no pointless retries
        (status,) = pm.of(STATUS_PATH)
        assert status.body["state"] == "stopped" and status.body["error"]["code"] == "INTERNAL"
        assert "readiness callback" in status.body["error"]["message"]


# --- loading while listening (issue 13 item 6, SPEC 4023/4031) ---------------------------------


def _wait_health(h: WorkerHarness, want: int, timeout: float = 10) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = h.client(None).get("/health")
        if r.status_code == want or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


def test_worker_4030_listens_while_loading_health_503_with_progress_then_ready(tmp_path: Path) -> None:
    """The port opens before the load; nothing but /health, /metrics, /worker/ready, /shutdown is served until sealed."""
    gate = threading.Event()
    with CallbackServer() as pm, WorkerHarness(tmp_path, Knobs(load_gate=gate, load_bytes=1000), callback_url=pm.url,
                                               wait_ready=False) as h:
        try:
            r = _wait_health(h, 503)
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["status"] == "loading" and body["state"] == "loading" and body["model"] is None
            assert body["progress"] == {"phase": "upload", "bytes_done": 500, "bytes_total": 1000}
            c = h.client()
            refused = {
                "execute": c.post("/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 2}}),
                "plan": c.post("/worker/plan", json={"model_ref": MODEL_NAME}),
                "commit": c.post("/worker/commit", json={"model_ref": MODEL_NAME}),
                "cancel": c.post("/cancel", json={"job_id": "j"}),
            }
            for name, resp in refused.items():
                assert resp.status_code == 503 and resp.json()["code"] == "WORKER_NOT_READY", (name, resp.text)
                assert "retry-after" in resp.headers, name
            for resp in (c.get("/v1/models"), c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "abc"})):
                assert resp.status_code == 503 and resp.json()["error"]["code"] == "WORKER_NOT_READY", resp.text
            assert h.client(None).post("/worker/execute", json={"prompt": "abc"}).status_code == 401  # auth first
            ready = c.get("/worker/ready")
            assert ready.status_code == 200 and ready.json()["ready"] is False and ready.json()["state"] == "loading"
            assert h.client(None).get("/metrics").status_code == 200
            assert pm.of(READY_PATH) == []  # SPEC 4023: the callback waits for the seal
        finally:
            gate.set()
        (callback,) = pm.wait_for(READY_PATH, timeout=10)
        assert callback.body["handle"]["sealed"] is True
        r = _wait_health(h, 200)
        assert r.status_code == 200 and "progress" not in r.json()
        for _ in range(200):
            if h.client(None).get("/health").json()["state"] == "ready":
                break
            time.sleep(0.02)
        assert h.client(None).get("/health").json() | {"uptime_seconds": 0} == r.json() | {
            "uptime_seconds": 0, "state": "ready"}
        assert execute(h).status_code == 200
    events = [json.loads(line)["event"] for line in h.log_lines()]
    assert events.index("listening") < events.index("sealed") < events.index("ready")


def test_worker_4031_load_failure_while_listening_exits_1_never_ready(tmp_path: Path) -> None:
    gate = threading.Event()
    knobs = Knobs(load_gate=gate, load_error=WorkerError("model needs 999 bytes but GPU 0 has 5 bytes free",
                                                         code=ErrorCode.INSUFFICIENT_VRAM))
    with CallbackServer() as pm, WorkerHarness(tmp_path, knobs, callback_url=pm.url, wait_ready=False) as h:
        try:
            assert _wait_health(h, 503).json()["status"] == "loading"
        finally:
            gate.set()
        assert h.join(10) == 1
        (status,) = pm.wait_for(STATUS_PATH, timeout=5)
        assert status.body["error"]["code"] == "INSUFFICIENT_VRAM" and pm.of(READY_PATH) == []
    with pytest.raises(httpx.HTTPError):  # the port is closed again
        httpx.get(h.url + "/health", timeout=2)
    failed = [line for line in h.log_lines() if '"event":"startup_failed"' in line]
    assert len(failed) == 1 and "INSUFFICIENT_VRAM" in failed[0]
    assert not any('"event":"ready"' in line for line in h.log_lines())


def test_worker_4970_shutdown_while_loading_exits_0_without_serving(tmp_path: Path) -> None:
    gate = threading.Event()
    with CallbackServer() as pm, WorkerHarness(tmp_path, Knobs(load_gate=gate), callback_url=pm.url, wait_ready=False) as h:
        try:
            assert _wait_health(h, 503).json()["status"] == "loading"
            ack = h.client().post("/shutdown")
            assert ack.status_code == 202 and ack.json() == {"status": "draining"}
            for _ in range(500):
                if any('"event":"shutdown"' in line for line in h.log_lines()):
                    break
                time.sleep(0.02)
            assert any('"event":"startup_aborted"' in line for line in h.log_lines())
        finally:
            gate.set()  # the load thread cannot be interrupted: a real process leaves it to exit (or the watchdog)
        assert h.join(10) == 0
        assert pm.of(READY_PATH) == []
    assert not any('"event":"ready"' in line for line in h.log_lines())


# --- commit (4220-4227, 4022) ---------------------------------------------------------------


def test_worker_4220_commit_by_reference(tmp_path: Path) -> None:
    with CallbackServer() as pm, WorkerHarness(tmp_path, model=False, callback_url=pm.url) as h:
        assert h.worker is not None and h.worker.state.value == "starting"
        c = h.client()
        assert execute(h).json()["code"] == "WORKER_NOT_READY"
        assert c.get("/worker/ready").json()["ready"] is False
        digest = hashlib.sha256(h.model_path.read_bytes()).hexdigest()
        wrong = c.post("/worker/commit", json={"model_ref": MODEL_NAME, "expected_digest": "0" * 64})
        assert wrong.status_code == 422 and wrong.json()["code"] == "MODEL_LOAD_FAILED"
        assert h.worker.state.value == "starting"  # a refused commit leaves the worker able to take another
        outside = c.post("/worker/commit", json={"model_ref": "/etc/passwd"})
        assert outside.status_code == 422 and "outside the model root" in outside.json()["message"]
        ok = c.post("/worker/commit", json={"model_ref": MODEL_NAME, "expected_digest": digest, "shard_id": "shard-a"})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["sealed"] is True and body["digest"] == digest and body["handle"]["shard_id"] == "shard-a"
        (ready,) = pm.wait_for(READY_PATH, timeout=10)
        assert ready.body["model_ref"] == MODEL_NAME
        for _ in range(100):
            if h.worker.state.value == "ready":
                break
            time.sleep(0.02)
        assert execute(h).status_code == 200
        again = c.post("/worker/commit", json={"model_ref": MODEL_NAME, "expected_digest": digest, "shard_id": "shard-a"})
        assert again.status_code == 200 and again.json() == body  # idempotent
        other = c.post("/worker/commit", json={"model_ref": "other.gguf", "expected_digest": "1" * 64})
        assert other.status_code == 422 and "SPEC 4022" in other.json()["message"]
        assert len(pm.of(READY_PATH)) == 1


def test_worker_4221_commit_streamed_bytes_with_size_cap(tmp_path: Path) -> None:
    with WorkerHarness(tmp_path, model=False, upload_dir=str(tmp_path)) as h:
        c = h.client()
        data = h.model_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        bad_type = c.post("/worker/commit", content=data, headers={"Content-Type": "text/plain"})
        assert bad_type.status_code == 400 and bad_type.json()["message"].startswith("Content-Type")
        no_ref = c.post("/worker/commit", content=data, headers={"Content-Type": "application/octet-stream"})
        assert no_ref.status_code == 400 and no_ref.json()["message"].startswith("model_ref")
        r = c.post(
            "/worker/commit", content=data, headers={"Content-Type": "application/octet-stream"},
            params={"model_ref": "uploaded-tiny", "expected_digest": digest},
        )
        assert r.status_code == 200, r.text
        assert r.json()["handle"]["model_ref"] == "uploaded-tiny" and r.json()["digest"] == digest
        assert not list(tmp_path.glob("worker-orcd-upload-*"))  # staging removed after the load


def test_worker_4225_streamed_commit_over_cap_refused(tmp_path: Path) -> None:
    with WorkerHarness(tmp_path, model=False, max_model_size_bytes=500, upload_dir=str(tmp_path)) as h:
        data = h.model_path.read_bytes()
        assert len(data) > 500

        def chunks() -> object:
            for i in range(0, len(data), 300):
                yield data[i:i + 300]

        for content in (data, chunks()):  # declared length, then chunked without one
            r = h.client().post(
                "/worker/commit", content=content, headers={"Content-Type": "application/octet-stream"},
                params={"model_ref": "big"},
            )
            assert r.status_code == 422 and "MAX_MODEL_SIZE" in r.json()["message"], r.text
        assert not list(tmp_path.glob("worker-orcd-upload-*"))


# --- seal (4121-4122, 4245) -----------------------------------------------------------------


def test_worker_4122_seal_failure_rejects_request_and_stops_worker(tmp_path: Path) -> None:
    with CallbackServer() as pm, WorkerHarness(tmp_path, callback_url=pm.url) as h:
        assert execute(h).status_code == 200
        h.engines[0].models[0].resident_fingerprint = "0" * 64  # resident bytes no longer what was sealed
        r = execute(h)
        assert r.status_code == 500 and r.json()["code"] == "SEAL_VERIFICATION_FAILED"
        (status,) = pm.wait_for(STATUS_PATH, timeout=10)
        assert status.body["error"]["code"] == "SEAL_VERIFICATION_FAILED" and status.body["state"] == "stopped"
        assert h.join(10) == 1
    assert any('"event":"fatal"' in line for line in h.log_lines())


# --- shutdown (4970-4972) -------------------------------------------------------------------


def test_worker_4970_shutdown_lets_running_job_finish_then_exits_0(tmp_path: Path) -> None:
    knobs = Knobs(step_s=0.02)
    with WorkerHarness(tmp_path, knobs, shutdown_timeout_sec=10) as h:
        with h.client().stream("POST", "/worker/execute", json={"prompt": "abcdef", "params": {"max_tokens": 25}}) as r:
            it = iter_events(r)
            assert next(it)[0] == "started"
            ack = h.client().post("/shutdown")
            assert ack.status_code == 202 and ack.json() == {"status": "draining"}
            assert h.worker is not None and h.worker.state.value == "draining"
            refused = execute(h)
            assert refused.status_code == 503 and refused.json()["code"] == "WORKER_NOT_READY"
            assert "retry-after" in refused.headers
            assert h.client(None).get("/health").json()["state"] == "draining"
            events = list(it)
        assert events[-1][0] == "end" and events[-1][1]["tokens_out"] == 25
        assert h.join(10) == 0
    engine = h.engines[0]
    assert engine.closed and engine.models[0].closed  # VRAM released
    assert h.forced == []
    assert any('"event":"shutdown"' in line for line in h.log_lines())


def test_worker_4972_shutdown_timeout_cancels_running_job(tmp_path: Path) -> None:
    knobs = Knobs(step_s=0.02)
    with WorkerHarness(tmp_path, knobs, shutdown_timeout_sec=1.0) as h:
        with h.client().stream("POST", "/worker/execute", json={"prompt": "abcdef", "params": {"max_tokens": 240}}) as r:
            it = iter_events(r)
            assert next(it)[0] == "started"
            t0 = time.monotonic()
            h.shutdown()
            events = list(it)
        assert events[-1][0] == "error" and events[-1][1]["code"] == "CANCELLED"
        assert "shutting down" in events[-1][1]["message"]
        assert h.join(5) == 0
        assert time.monotonic() - t0 < 1.0 + 0.5
    assert h.forced == [] and h.engines[0].closed


# --- startup failures (4023, 4961) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "code", "needle"),
    [
        ("load_error", "INSUFFICIENT_VRAM", "needs 999 bytes"),
        ("no_token_file", "AUTH_FAILED", "does not exist"),
        ("outside_root", "MODEL_LOAD_FAILED", "outside the model root"),
    ],
)
def test_worker_4961_startup_failure_reports_status_and_exits_1(tmp_path: Path, setup: str, code: str, needle: str) -> None:
    knobs = Knobs()
    overrides: dict[str, object] = {}
    if setup == "load_error":
        knobs.load_error = WorkerError("model needs 999 bytes but GPU 0 has 5 bytes free", code=ErrorCode.INSUFFICIENT_VRAM)
    elif setup == "no_token_file":
        overrides["api_token_file"] = str(tmp_path / "missing-token")
    else:
        overrides["model"] = "/etc/hostname"
    with CallbackServer() as pm:
        with WorkerHarness(tmp_path, knobs, callback_url=pm.url, **overrides) as h:
            assert h.join(10) == 1
        (status,) = pm.wait_for(STATUS_PATH, timeout=5)
        assert status.body["error"]["code"] == code and needle in status.body["error"]["message"]
        assert pm.of(READY_PATH) == []
    failed = [line for line in h.log_lines() if '"event":"startup_failed"' in line]
    assert len(failed) == 1 and code in failed[0]


def test_worker_4200_ready_endpoint_open_by_config(tmp_path: Path) -> None:
    with WorkerHarness(tmp_path, ready_open=True) as h:
        r = h.client(None).get("/worker/ready")
        assert r.status_code == 200 and r.json()["ready"] is True
        assert h.client("wrong-token-but-long-enough").get("/worker/ready").status_code == 401  # a bad token is still bad
        assert h.client(TOKEN_A).get("/worker/ready").status_code == 200


def test_worker_4030_states_visible_in_health(tmp_path: Path) -> None:
    knobs = Knobs(step_s=0.05)
    with WorkerHarness(tmp_path, knobs) as h:
        anon = h.client(None)
        assert anon.get("/health").json()["state"] == "ready"
        with h.client().stream("POST", "/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 10}}) as r:
            it = iter_events(r)
            next(it)
            assert anon.get("/health").json()["state"] == "executing"
            list(it)
        for _ in range(100):
            if anon.get("/health").json()["state"] == "ready":
                break
            time.sleep(0.02)
        assert anon.get("/health").json()["state"] == "ready"
        assert parse(execute(h).text)[-1][0] == "end"


def test_worker_gpu_only_cpu_mode_plan_says_host_memory(tmp_path: Path) -> None:
    """SPEC "GPU only": in development mode the plan says so and never calls host RAM device memory."""
    with WorkerHarness(tmp_path, Knobs(vram_total=1000), model=False) as h:
        body = h.client().post("/worker/plan", json={"model_ref": "tiny.gguf"}).json()
    assert body["dev_mode"] is True and body["feasible"] is False
    (reason,) = body["reasons"]
    assert "host memory" in reason and "development mode" in reason and "device memory" not in reason
