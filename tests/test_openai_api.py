"""The OpenAI façade against a real server (fake engine): shapes, errors, limits, stop strings, fuzzing.

The official-client tests on the real model are in test_openai_integration.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http_fakes import MODEL_NAME, TOKEN_A, Knobs, WorkerHarness

TEMPLATE = Path(__file__).parent / "data" / "tiny_chat_template.jinja"


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHarness]:
    knobs = Knobs(max_seq_len=128, step_s=0.001)
    with WorkerHarness(tmp_path_factory.mktemp("oai"), knobs, max_prompt_chars=200, max_tokens_out=32,
                       chat_template=str(TEMPLATE)) as harness:
        yield harness


def chat(h: WorkerHarness, **kw: Any) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "temperature": 0, **kw}
    with h.client() as c:
        return c.post("/v1/chat/completions", json=body)


def sse_chunks(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_oai_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_models_lists_the_sealed_model(h: WorkerHarness) -> None:
    with h.client() as c:
        body = c.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL_NAME]
    assert body["data"][0]["object"] == "model" and body["data"][0]["created"] > 1_600_000_000


def test_chat_non_stream_and_stream_same_text_usage_and_fingerprint(h: WorkerHarness) -> None:
    r = chat(h, max_tokens=7)
    assert r.status_code == 200, r.text
    body = r.json()
    rendered = "<|user|>hello\n<|assistant|>"  # the template's text; the fake model echoes the prompt ids
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == rendered[:7]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(rendered), "completion_tokens": 7, "total_tokens": len(rendered) + 7}
    assert body["system_fingerprint"].startswith("fp_") and body["id"].startswith("chatcmpl-")
    r = chat(h, max_tokens=7, stream=True, stream_options={"include_usage": True})
    chunks = sse_chunks(r.text)
    assert chunks[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
    assert text == rendered[:7]
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"] == body["usage"]
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"


def _counter(h: WorkerHarness, name: str, label: str = "") -> float:
    with h.client() as c:
        for line in c.get("/metrics").text.splitlines():
            if line.startswith(name + label + " ") or (not label and line.startswith(name + " ")):
                return float(line.split()[-1])
    return 0.0


def test_stop_string_across_tokens_is_not_emitted_and_job_completes(h: WorkerHarness) -> None:
    # one token per byte: "user" spans four tokens
    done0 = _counter(h, "worker_jobs_completed_total")
    cancelled0 = _counter(h, "worker_jobs_failed_total", '{code="CANCELLED"}')
    for stream in (False, True):
        r = chat(h, max_tokens=20, stop=["ser|", "zzz"], stream=stream)
        if stream:
            chunks = sse_chunks(r.text)
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
            finish = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
        else:
            text, finish = r.json()["choices"][0]["message"]["content"], [r.json()["choices"][0]["finish_reason"]]
        assert text == "<|u" and finish == ["stop"]
    assert chat(h, max_tokens=2).status_code == 200  # the slot is free again at once
    assert _counter(h, "worker_jobs_completed_total") == done0 + 3  # a stop string ends a job as a success
    assert _counter(h, "worker_jobs_failed_total", '{code="CANCELLED"}') == cancelled0


def test_completions_endpoint(h: WorkerHarness) -> None:
    with h.client() as c:
        r = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "abcdef", "max_tokens": 4, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["choices"][0]["text"] == "abcd"
    assert body["usage"]["prompt_tokens"] == 6


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"), ({"max_tokens": 33}, "max_tokens"),
     ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"temperature": 3}, "temperature"),
     ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"), ({"logit_bias": {"1": 5}}, "logit_bias"),
     ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
      "response_format.json_schema.schema"),
     ({"stream_options": {"include_usage": True}}, "stream_options"), ({"frobnicate": 1}, "frobnicate")],
)
def test_bad_params_are_400_naming_the_param(h: WorkerHarness, extra: dict[str, Any], param: str) -> None:
    assert_oai_error(chat(h, **extra), 400, "INVALID_PARAMS", param)


def test_ignored_params_accepted_and_limits_apply(h: WorkerHarness) -> None:
    assert chat(h, max_tokens=2, user="u1", store=False, metadata={"a": "b"}, service_tier="auto").status_code == 200
    long = [{"role": "user", "content": "x" * 150}, {"role": "user", "content": "y" * 60}]
    assert_oai_error(chat(h, messages=long), 400, "INVALID_PARAMS", "messages")  # --max-prompt-chars on the render
    assert_oai_error(chat(h, messages=[{"role": "user", "content": "a\u0000"}]), 400, "INVALID_PARAMS", "messages[0].content")
    assert_oai_error(chat(h, model="other"), 404, "NOT_FOUND", "model")


def test_auth_errors_in_openai_shape(h: WorkerHarness) -> None:
    for token in (None, "wrong-token-but-long-enough"):
        with h.client(token) as c:
            r = c.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": []})
        err = assert_oai_error(r, 401, "AUTH_FAILED")
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"].startswith("Bearer")
        with h.client(token) as c:
            assert c.get("/v1/models").status_code == 401


def test_busy_is_503_with_retry_after(h: WorkerHarness) -> None:
    h.knobs.step_s = 0.05
    try:
        with h.client() as c, c.stream("POST", "/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 30, "stream": True,
        }) as first:
            lines = first.iter_lines()  # held: a collected line iterator closes the stream (a disconnect)
            next(lines)
            r = chat(h, max_tokens=2)
            assert_oai_error(r, 503, "WORKER_BUSY")
            assert int(r.headers["retry-after"]) >= 1
    finally:
        h.knobs.step_s = 0.001


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_fields = st.sampled_from([
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
    "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "response_format", "stream",
    "stream_options", "user", "logit_bias", "tools", "echo", "best_of", "suffix", "top_k",
])
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                            "content": st.text(max_size=30) | _json}), max_size=3)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       body=st.dictionaries(_fields, _json, max_size=6), messages=_messages | _json,
       base=st.booleans())
def test_fuzz_request_bodies_never_500(h: WorkerHarness, path: str, body: dict[str, Any], messages: Any, base: bool) -> None:
    if base:  # mostly-valid bodies reach deeper than schema validation
        body = {"model": MODEL_NAME, "max_tokens": 2, **body}
        body.setdefault("messages" if "chat" in path else "prompt", messages if "chat" in path else "hi")
    with h.client(TOKEN_A) as c:
        r = c.post(path, json=body)
    assert r.status_code < 500 or r.status_code == 503, r.text
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["code"] and err["message"]
