"""HTTP surface against a real server (fake engine): auth, health, ready, validation, OpenAPI, metrics, logs.

SPEC 4200-4203, 4230-4232, 4240-4244, 4300-4305, 4800-4812, 4950-4951.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_http_fakes import TOKEN_A, TOKEN_B, Knobs, WorkerHarness, iter_events

from worker_orcd.auth import fp6


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHarness]:
    knobs = Knobs(max_seq_len=64)
    with WorkerHarness(tmp_path_factory.mktemp("api"), knobs, max_prompt_chars=40, max_tokens_out=32) as harness:
        yield harness


def assert_error(resp: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"code", "message", "retriable", "retry_after_ms"}  # SPEC 4951, everywhere
    assert body["code"] == code, body
    if field is not None:
        assert body["message"].startswith(f"{field}: "), body["message"]
    return body


# --- auth (4200-4203) ------------------------------------------------------------------------


def test_worker_4200_health_and_metrics_need_no_token(h: WorkerHarness) -> None:
    anon = h.client(None)
    r = anon.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["state"] == "ready" and body["model"] == "tiny.gguf"
    assert body["dev_mode"] is True and body["device"] == "cpu" and body["vram_bytes"] == 0  # nothing claims VRAM on CPU
    assert body["uptime_seconds"] > 0
    assert anon.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/worker/execute", {"prompt": "hi"}), ("POST", "/execute", {"prompt": "hi"}), ("POST", "/cancel", {"job_id": "x"}),
     ("POST", "/worker/plan", {"model_ref": "tiny.gguf"}), ("POST", "/worker/commit", {"model_ref": "tiny.gguf"}),
     ("GET", "/worker/ready", None), ("POST", "/shutdown", None)],
)
@pytest.mark.parametrize("token", [None, "wrong-token-but-long-enough"])
def test_worker_4203_protected_endpoints_refuse_missing_or_wrong_token(
    h: WorkerHarness, method: str, path: str, body: dict[str, Any] | None, token: str | None
) -> None:
    r = h.client(token).request(method, path, json=body)
    assert_error(r, 401, "AUTH_FAILED")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert h.worker is not None and h.worker.state.value == "ready"  # /shutdown without auth did nothing


def test_worker_4202_request_log_line_has_fp6_never_the_token(h: WorkerHarness) -> None:
    r = h.client(TOKEN_B).get("/worker/ready", headers={"X-Correlation-Id": "corr-fp6-check"})
    assert r.status_code == 200
    # the request line is written once the response has been sent: under load it can trail the client
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in h.log_lines()]
        mine = [rec for rec in lines if rec.get("correlation_id") == "corr-fp6-check" and rec["event"] == "http_request"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(mine) == 1 and mine[0]["fp6"] == fp6(TOKEN_B) and mine[0]["status"] == 200
    assert TOKEN_A not in h.log.getvalue() and TOKEN_B not in h.log.getvalue()


# --- ready / correlation --------------------------------------------------------------------


def test_worker_4230_ready_lists_the_sealed_handle(h: WorkerHarness) -> None:
    body = h.client().get("/worker/ready").json()
    assert body["ready"] is True and body["nccl_group_id"] is None and body["dev_mode"] is True
    (handle,) = body["handles"]
    assert handle["sealed"] is True and len(handle["digest"]) == 64 and handle["model_ref"] == "tiny.gguf"
    assert "seal" not in handle and "fingerprint" not in handle  # SPEC 4111: no internals


def test_worker_4801_correlation_id_echoed_or_generated_and_validated(h: WorkerHarness) -> None:
    c = h.client(None)
    assert c.get("/health", headers={"X-Correlation-Id": "abc-123"}).headers["x-correlation-id"] == "abc-123"
    generated = c.get("/health").headers["x-correlation-id"]
    assert len(generated) == 32
    assert_error(c.get("/health", headers={"X-Correlation-Id": "bad id with spaces"}), 400, "INVALID_PARAMS", "X-Correlation-Id")
    assert_error(c.get("/health", headers={"X-Correlation-Id": "x" * 200}), 400, "INVALID_PARAMS", "X-Correlation-Id")


# --- validation (4242-4244, 4300-4305) ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"prompt": "a\u0000b"}, "prompt", "NUL"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "x" * 41}, "prompt", "41 characters; the limit is 40"),
        ({"prompt": "hi", "params": {"max_tokens": 33}}, "params.max_tokens", "over the limit of 32"),
        ({"prompt": "y" * 40, "params": {"max_tokens": 30}}, "params.max_tokens", "exceed the context of 64"),
        ({"prompt": "hi", "params": {"max_tokens": 0}}, "params.max_tokens", "greater than or equal to 1"),
        ({"prompt": "hi", "params": {"temperature": 2.5}}, "params.temperature", "less than or equal to 2"),
        ({"prompt": "hi", "params": {"temperature": -0.1}}, "params.temperature", "greater than or equal to 0"),
        ({"prompt": "hi", "params": {"temperature": "0.5"}}, "params.temperature", "valid number"),
        ({"prompt": "hi", "params": {"seed": -1}}, "params.seed", "greater than or equal to 0"),
        ({"prompt": "hi", "params": {"seed": 2**64}}, "params.seed", "less than or equal to 18446744073709551615"),
        ({"prompt": "hi", "params": {"seed": 1.5}}, "params.seed", "valid integer"),
        ({"prompt": "hi", "params": {"top_p": 0}}, "params.top_p", "greater than 0"),
        ({"prompt": "hi", "params": {"stop_token_ids": [-4]}}, "params.stop_token_ids", "token ids"),
        ({"prompt": "hi", "params": {"max_tokens": True}}, "params.max_tokens", "valid integer"),
        ({"prompt": "hi", "colour": "red"}, "colour", "unknown field"),
        ({"prompt": "hi", "params": {"beam": 4}}, "params.beam", "unknown field"),
        ({"prompt": 5}, "prompt", "valid string"),
        ({"params": {}}, "prompt", "Field required"),
        ({"prompt": "hi", "job_id": "has space"}, "job_id", "pattern"),
        ({"prompt": "hi", "handle_id": "no-such-shard"}, "handle_id", "no sealed handle"),
    ],
)
def test_worker_4300_execute_validation_names_the_field(h: WorkerHarness, body: dict[str, Any], field: str, rule: str) -> None:
    r = h.client().post("/worker/execute", json=body)
    status = 404 if field == "handle_id" and "no sealed" in rule else 400
    err = assert_error(r, status, "NOT_FOUND" if status == 404 else "INVALID_PARAMS", field)
    assert rule in err["message"], err["message"]
    assert err["retriable"] is False
    if "prompt" in body and isinstance(body["prompt"], str) and len(body["prompt"]) > 3:
        assert body["prompt"] not in err["message"]  # prompts are never echoed


def test_worker_4420_prompt_tokens_over_context_refused(h: WorkerHarness) -> None:
    # 40 characters pass the character limit, but 3-byte characters make 120 tokens > context 64 - 1.
    r = h.client().post("/worker/execute", json={"prompt": "世" * 40})
    err = assert_error(r, 400, "INVALID_PARAMS", "prompt")
    assert "120 tokens; the limit is 63" in err["message"]


def test_worker_4305_lone_surrogate_and_bad_json_refused(h: WorkerHarness) -> None:
    c = h.client()
    r = c.post("/worker/execute", content=b'{"prompt": "\\ud800"}', headers={"Content-Type": "application/json"})
    msg = assert_error(r, 400, "INVALID_PARAMS", "prompt")["message"]
    assert "surrogate" in msg or "unicode" in msg
    r = c.post("/worker/execute", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert "not valid JSON" in assert_error(r, 400, "INVALID_PARAMS", "body")["message"]
    r = c.post("/worker/execute", content=b"[1]", headers={"Content-Type": "application/json"})
    assert_error(r, 400, "INVALID_PARAMS")


def test_worker_4242_oversized_body_refused_before_parsing(h: WorkerHarness) -> None:
    c = h.client()
    big = json.dumps({"prompt": "x" * 2_000_000}).encode()
    r = c.post("/worker/execute", content=big, headers={"Content-Type": "application/json"})
    assert "exceeds" in assert_error(r, 400, "INVALID_PARAMS", "body")["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: caught while the body streams in
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = c.post("/worker/execute", content=chunks(), headers={"Content-Type": "application/json"})
    assert "exceeds" in assert_error(r, 400, "INVALID_PARAMS", "body")["message"]


def test_worker_4950_unknown_route_and_method_use_the_error_model(h: WorkerHarness) -> None:
    assert_error(h.client().get("/nope"), 404, "NOT_FOUND")
    assert_error(h.client().get("/worker/execute"), 405, "INVALID_PARAMS")


def test_worker_4300_cancel_and_plan_validation(h: WorkerHarness) -> None:
    c = h.client()
    assert_error(c.post("/cancel", json={}), 400, "INVALID_PARAMS", "job_id")
    assert_error(c.post("/cancel", json={"job_id": "x", "extra": 1}), 400, "INVALID_PARAMS", "extra")
    assert_error(c.post("/cancel", json={"job_id": "never-started"}), 404, "NOT_FOUND", "job_id")
    assert_error(c.post("/worker/plan", json={"model_ref": "tiny.gguf", "tp_degree": 2}), 400, "INVALID_PARAMS", "tp_degree")
    assert_error(c.post("/worker/plan", json={"model_ref": "tiny.gguf", "shard_layout": "ring"}), 400, "INVALID_PARAMS", "shard_layout")


# --- plan (4210-4214) -----------------------------------------------------------------------


def test_worker_4210_plan_reports_feasibility_and_mcd(h: WorkerHarness) -> None:
    body = h.client().post("/worker/plan", json={"model_ref": "tiny.gguf"}).json()
    assert body["feasible"] is True and body["reasons"] == []  # the loaded model itself fits
    assert body["vram_required"] == 1 << 20 and body["shard_plan"][0]["vram_bytes"] == 1 << 20
    assert body["mcd"]["architecture"] == "llama" and len(body["digest"]) == 64
    tp = h.client().post("/worker/plan", json={"model_ref": "tiny.gguf", "shard_layout": "tensor_parallel", "tp_degree": 2}).json()
    # a worker started without --tp-* flags plans each rank's share, but cannot hold one itself
    assert tp["feasible"] is False and any("started with --tp-degree 1" in r for r in tp["reasons"]), tp
    assert [s["shard_index"] for s in tp["shard_plan"]] == [0, 1]
    assert all(s["gpu_device"] is None for s in tp["shard_plan"])


def test_worker_4340_plan_of_model_outside_root_refused(h: WorkerHarness, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    r = h.client().post("/worker/plan", json={"model_ref": str(outside)})
    assert "outside the model root" in assert_error(r, 422, "MODEL_LOAD_FAILED")["message"]


# --- OpenAPI ------------------------------------------------------------------------------


def test_worker_openapi_document_describes_the_api(h: WorkerHarness) -> None:
    doc = h.client(None).get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    expected = {
        "/worker/plan": "post", "/worker/commit": "post", "/worker/ready": "get", "/worker/execute": "post",
        "/execute": "post", "/cancel": "post", "/shutdown": "post", "/health": "get", "/metrics": "get",
    }
    for path, method in expected.items():
        assert method in paths[path], path
    schemas = doc["components"]["schemas"]
    req = schemas["ExecuteRequest"]
    assert req["additionalProperties"] is False and req["properties"]["prompt"]["minLength"] == 1
    params = schemas["SamplingIn"]
    assert params["additionalProperties"] is False
    assert params["properties"]["temperature"]["maximum"] == 2.0
    assert params["properties"]["seed"]["maximum"] == 2**64 - 1
    assert "text/event-stream" in paths["/worker/execute"]["post"]["responses"]["200"]["content"]
    assert paths["/worker/execute"]["post"]["responses"]["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    commit_body = paths["/worker/commit"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(commit_body)
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in paths["/health"]["get"] and "security" in paths["/worker/execute"]["post"]
    op_ids = [op["operationId"] for p in paths.values() for op in p.values()]
    assert len(op_ids) == len(set(op_ids))


# --- metrics and logs (4800-4812) -----------------------------------------------------------


def metric(h: WorkerHarness, name: str, labels: dict[str, str] | None = None) -> float:
    text = h.client(None).get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_worker_4810_metrics_move_with_a_job(h: WorkerHarness) -> None:
    before = {
        "started": metric(h, "worker_jobs_started_total"), "done": metric(h, "worker_jobs_completed_total"),
        "gen": metric(h, "worker_tokens_generated_total"), "in": metric(h, "worker_tokens_in_total"),
        "ttft": metric(h, "worker_time_to_first_token_ms_count"), "seal": metric(h, "worker_seal_verify_ms_count"),
    }
    with h.client().stream("POST", "/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 5}}) as r:
        events = list(iter_events(r))
    assert events[-1][0] == "end"
    assert metric(h, "worker_jobs_started_total") == before["started"] + 1
    assert metric(h, "worker_jobs_completed_total") == before["done"] + 1
    assert metric(h, "worker_tokens_generated_total") == before["gen"] + 5
    assert metric(h, "worker_tokens_in_total") == before["in"] + 3
    assert metric(h, "worker_time_to_first_token_ms_count") == before["ttft"] + 1
    assert metric(h, "worker_seal_verify_ms_count") == before["seal"] + 1
    assert metric(h, "worker_state", {"state": "ready"}) == 1 and metric(h, "worker_state", {"state": "executing"}) == 0
    assert metric(h, "worker_requests_total", {"outcome": "success"}) >= 1
    assert metric(h, "worker_uptime_seconds") > 0
    for name in ("worker_vram_bytes", "worker_cuda_errors_total", "worker_inference_duration_ms_count", "worker_inter_token_latency_ms_count"):
        metric(h, name)


def test_worker_4802_logs_are_json_and_never_hold_prompt_or_output(h: WorkerHarness) -> None:
    marker = "ZEBRA-7781-PROMPT-MARKER"
    with h.client().stream("POST", "/worker/execute", json={"prompt": marker, "params": {"max_tokens": 8}}) as r:
        text = "".join(d["t"] for e, d in iter_events(r) if e == "token")
    assert text == marker[:8]  # the echo model generated prompt text...
    records = [json.loads(line) for line in h.log_lines()]  # ...every line is one JSON object...
    assert all({"ts", "level", "event", "human"} <= set(rec) for rec in records)
    assert marker not in h.log.getvalue() and marker[:8] not in h.log.getvalue()  # ...and none carries it
    events = {rec["event"] for rec in records}
    assert {"startup", "sealed", "ready", "execute_start", "execute_end", "http_request"} <= events
    end = [rec for rec in records if rec["event"] == "execute_end"][-1]
    assert end["tokens_out"] == 8 and "decode_time_ms" in end and end["job_id"]
