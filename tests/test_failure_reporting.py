"""Fatal failures (SPEC 4032, 4122, 4960-4961): stopped, status callback with the code, exit non-zero.

The seal case runs the real engine (CPU here, the GPU under
REQUIRE_REAL_GPU=1) on a tiny synthetic Qwen2 model with the real Qwen
tokenizer, in process: a bit of the resident weights is flipped from the
test, exactly what a stray write into device memory would do, and the next
execute must find it. No hook in the worker makes this
possible; the test reaches into the engine's own tensors. The CUDA error
cases use the fake engine, which raises the engine's CUDA_ERROR the way the
real engine translates a driver error, inside serve() on a real socket.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from callback_server import READY_PATH, STATUS_PATH, CallbackServer
from test_http_fakes import TOKEN_A, Knobs, WorkerHarness, iter_events

from worker_orcd.auth import BearerAuth
from worker_orcd.config import load_config
from worker_orcd.errors import ErrorCode, WorkerError
from worker_orcd.http import create_app
from worker_orcd.http.sse import parse
from worker_orcd.lifecycle import Commit, State, Worker
from worker_orcd.serve import real_binding
from synthetic import synth as _synth

REPO = Path(__file__).resolve().parents[1]
CUDA_FAILURE = WorkerError("CUDA error: an illegal memory access was encountered (device 0)", code=ErrorCode.CUDA_ERROR)




def wait_until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# --- seal failure on the real engine (4121-4122, 4960-4961) ---------------------------------


def test_worker_4122_flipped_resident_byte_stops_reports_and_exits_nonzero(
    tokenizer_donor: Path, tmp_path: Path, device: str
) -> None:
    import torch

    model_path = _synth().write_synthetic_model(tmp_path / "tiny-qwen2.gguf", "tiny-qwen2", "F16", tokenizer_from=tokenizer_donor)
    exits: list[int] = []
    with CallbackServer(probe_health=False) as pm:
        config = load_config(
            {
                "worker_id": "w-seal", "device": device, "model_root": str(tmp_path), "callback_url": pm.url,
                "api_token_file": str(tmp_path / "unused-token"), "shutdown_timeout_sec": 1, "max_tokens_out": 8,
                "engine_process": "off",  # the test flips a byte of the weights: they must live in this process
            },
            env={},
        )
        worker = Worker(config, real_binding(config), force_exit=exits.append)

        async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
            await worker.open_device()
            await worker.commit(Commit(model_ref=model_path.name, source=model_path.name, model_root=tmp_path))
            worker.uri = "http://worker.test"
            await worker.announce_ready()
            app = create_app(worker, BearerAuth([TOKEN_A]))
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": f"Bearer {TOKEN_A}"}
            async with httpx.AsyncClient(transport=transport, base_url=worker.uri, headers=headers, timeout=60) as c:
                body = {"prompt": "!", "params": {"max_tokens": 2}}
                ok = await c.post("/worker/execute", json=body)
                assert worker.model is not None
                arena: torch.Tensor = worker.model._weights.arena  # type: ignore[attr-defined]
                arena[arena.numel() // 2] ^= 0x10  # one bit of one weight, as a stray device write would
                refused = await c.post("/worker/execute", json=body, headers={"X-Correlation-Id": "seal-broken"})
                assert worker.state == State.STOPPED  # at once, before anything else runs
                await asyncio.wait_for(worker.stop_requested.wait(), 10)  # serve() would now exit
                health = await c.get("/health")
            await worker.close()
            return ok, refused, health

        ok, refused, health = asyncio.run(scenario())
        assert parse(ok.text)[-1][0] == "end"  # the intact model served
        # the engine loop checks the seal once per step that admits jobs (issue 8): the stream opened,
        # then the job failed before any token, and the worker stopped
        assert refused.status_code == 200
        assert [e for e, _ in parse(refused.text)] == ["started", "error"]
        assert parse(refused.text)[-1][1]["code"] == "SEAL_VERIFICATION_FAILED"
        assert refused.headers["x-correlation-id"] == "seal-broken"
        assert health.status_code == 503 and health.json()["state"] == "stopped"
        (status,) = pm.wait_for(STATUS_PATH, timeout=10)
        assert len(pm.of(READY_PATH)) == 1
    assert status.body["state"] == "stopped" and status.body["worker_id"] == "w-seal"
    assert status.body["error"]["code"] == "SEAL_VERIFICATION_FAILED" and status.body["error"]["retriable"] is False
    wait_until(lambda: bool(exits), 5)  # nothing stopped the process: the watchdog's exit path ran
    assert exits == [1]
    reg = worker.metrics.registry
    assert reg.get_sample_value("worker_requests_total", {"outcome": "SEAL_VERIFICATION_FAILED"}) == 1
    assert reg.get_sample_value("worker_state", {"state": "stopped"}) == 1
    assert reg.get_sample_value("worker_cuda_errors_total") == 0


# --- CUDA errors (4032, 4960-4961) ------------------------------------------------------------


def records(h: WorkerHarness) -> list[dict[str, Any]]:
    return [json.loads(line) for line in h.log_lines()]


def test_worker_4960_cuda_error_mid_stream_fails_job_reports_and_exits_1(tmp_path: Path) -> None:
    knobs = Knobs(step_s=0.01, fail_at=3, fail_with=CUDA_FAILURE)
    with CallbackServer() as pm, WorkerHarness(tmp_path, knobs, callback_url=pm.url) as h:
        with h.client().stream("POST", "/worker/execute", json={"prompt": "abcdef", "params": {"max_tokens": 20}}) as r:
            events = list(iter_events(r))
        assert [e for e, _ in events] == ["started", "token", "token", "token", "error"]
        assert events[-1][1]["code"] == "CUDA_ERROR" and "illegal memory access" in events[-1][1]["message"]
        (status,) = pm.wait_for(STATUS_PATH, timeout=10)
        assert status.body["error"]["code"] == "CUDA_ERROR" and status.body["state"] == "stopped"
        assert h.join(10) == 1  # serve() returns 1: the process exits non-zero, the supervisor restarts it
    assert h.forced == []  # ...by the orderly path, well before the watchdog
    assert h.worker is not None
    reg = h.worker.metrics.registry
    assert reg.get_sample_value("worker_cuda_errors_total") == 1
    assert reg.get_sample_value("worker_jobs_failed_total", {"code": "CUDA_ERROR"}) == 1
    assert reg.get_sample_value("worker_requests_total", {"outcome": "CUDA_ERROR"}) == 1
    recs = records(h)
    fatal = next(rec for rec in recs if rec["event"] == "fatal")
    assert fatal["code"] == "CUDA_ERROR" and fatal["level"] == "error" and "supervisor restarts it" in fatal["human"]
    assert fatal.get("correlation_id") and fatal.get("job_id")  # the request that hit it
    assert recs[-1]["event"] == "shutdown" and recs[-1]["exit_code"] == 1


def test_worker_4032_cuda_error_while_committing_is_fatal(tmp_path: Path) -> None:
    knobs = Knobs(load_error=CUDA_FAILURE)
    with CallbackServer() as pm, WorkerHarness(tmp_path, knobs, model=False, callback_url=pm.url) as h:
        r = h.client().post("/worker/commit", json={"model_ref": "tiny.gguf"})
        assert r.status_code == 500 and r.json()["code"] == "CUDA_ERROR"
        (status,) = pm.wait_for(STATUS_PATH, timeout=10)
        assert status.body["error"]["code"] == "CUDA_ERROR"
        assert h.join(10) == 1
    assert h.worker is not None and h.worker.state == State.STOPPED and h.forced == []


def test_worker_4961_cuda_error_at_startup_reported_once(tmp_path: Path) -> None:
    """The load's fatal path and serve()'s startup-failure path both report; the pool manager hears it once."""
    with CallbackServer() as pm, WorkerHarness(tmp_path, Knobs(load_error=CUDA_FAILURE), callback_url=pm.url) as h:
        assert h.join(10) == 1
        time.sleep(0.3)  # a second report would have been sent by now
        (status,) = pm.of(STATUS_PATH)
        assert not pm.of(READY_PATH)
    assert status.body["error"]["code"] == "CUDA_ERROR" and status.body["state"] == "stopped"
    assert h.worker is not None and h.worker.metrics.registry.get_sample_value("worker_cuda_errors_total") == 1


@pytest.mark.parametrize("code", [ErrorCode.VRAM_OOM, ErrorCode.INFERENCE_TIMEOUT, ErrorCode.INVALID_PARAMS])
def test_worker_4960_recoverable_engine_errors_do_not_stop_the_worker(tmp_path: Path, code: ErrorCode) -> None:
    knobs = Knobs(fail_at=1, fail_with=WorkerError("recoverable", code=code))
    with WorkerHarness(tmp_path, knobs) as h:
        events = parse(h.client().post("/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 5}}).text)
        assert events[-1][1]["code"] == code.value
        assert h.worker is not None
        wait_until(lambda: h.worker is not None and h.worker.state == State.READY, 5)
        knobs.fail_at = None
        assert parse(h.client().post("/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 2}}).text)[-1][0] == "end"
    assert h.exit_code == 0
