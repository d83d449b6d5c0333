"""Structured logs (SPEC 4800-4803, 4820-4822): line format, structural redaction, context, narration.

The formatter and the log API are tested directly; the request context and
the narration at the key points run through the real HTTP stack with the
fake engine (test_http_fakes.WorkerHarness). The redaction grep against a
real server process on the real model is in test_serve_integration.py.
"""

from __future__ import annotations

import ast
import asyncio
import contextvars
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_http_fakes import TOKEN_A, Knobs, WorkerHarness, iter_events

from worker_orcd import logs
from worker_orcd.errors import ErrorCode, WorkerError

PACKAGE = Path(logs.__file__).resolve().parent
# Call sites not (yet) converted to literal templates, owned by another change; the test below
# fails as soon as one of them is converted, so this list can only shrink.
PENDING_LITERAL_TEMPLATES: frozenset[str] = frozenset()


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("debug", stream=stream, worker_id="w-logs", gpu_device=0)
    yield stream


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def record_for(name: str, level: int = logging.INFO, exc: BaseException | None = None) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, "message %s", ("with an argument",), None)
    if exc is not None:
        rec.exc_info = (type(exc), exc, exc.__traceback__)
    return rec


# --- line format (4800) --------------------------------------------------------------------


def test_worker_4800_one_json_object_per_line_with_context(out: io.StringIO) -> None:
    logs.set_context(model_ref="m.gguf")
    token = logs.bind(correlation_id="c-1")
    try:
        logs.update(job_id="job-1")
        logs.event(
            "execute_end", "Job {job_id} finished: {tokens_out} tokens in {decode_time_ms:.0f} ms.",
            tokens_in=3, tokens_out=7, decode_time_ms=123.4,
        )
    finally:
        logs.reset(token)
    logs.event("state", "Worker state {from_state} -> {state}.", state="ready", from_state="loading")
    first, second = records(out)
    assert list(first)[:4] == ["ts", "level", "event", "human"]
    assert first["ts"].endswith("+00:00") and first["level"] == "info" and first["event"] == "execute_end"
    assert first["human"] == "Job job-1 finished: 7 tokens in 123 ms."
    assert {k: first[k] for k in ("worker_id", "gpu_device", "model_ref", "correlation_id", "job_id")} == {
        "worker_id": "w-logs", "gpu_device": 0, "model_ref": "m.gguf", "correlation_id": "c-1", "job_id": "job-1"
    }
    assert (first["tokens_in"], first["tokens_out"], first["decode_time_ms"]) == (3, 7, 123.4)
    assert "correlation_id" not in second and "job_id" not in second  # the request context ended
    assert second["human"] == "Worker state loading -> ready."


def test_worker_4800_log_level_filters(out: io.StringIO) -> None:
    logs.configure("warning", stream=out, worker_id="w-logs")
    logs.event("quiet", "Not shown.")
    logs.event("loud", "Shown.", level=logging.WARNING)
    logs.configure("debug", stream=out, worker_id="w-logs")
    logs.event("debug_line", "Shown at debug.", level=logging.DEBUG)
    assert [r["event"] for r in records(out)] == ["loud", "debug_line"]


def test_worker_4800_event_names_and_context_fields_are_checked(out: io.StringIO) -> None:
    with pytest.raises(ValueError, match="lower_snake_case"):
        logs.event("Bad Name", "x")
    with pytest.raises(ValueError, match="not an allowed log field"):
        logs.set_context(prompt="anything")
    with pytest.raises(ValueError, match="not an allowed log field"):
        logs.bind(authorization="Bearer x")


# --- structural redaction (4802) -----------------------------------------------------------


def test_worker_4802_fields_outside_the_allow_list_or_of_the_wrong_kind_are_dropped(out: io.StringIO) -> None:
    secret = "SECRET-PROMPT-4802"
    logs.event(
        "execute_start", "Job {job_id} started.",
        prompt=secret, text=secret, token=secret, authorization=f"Bearer {secret}",  # not allowed at all
        tokens=[1, 2, 3], job_id={"id": secret}, tokens_in=secret, error=secret.encode(),  # wrong kinds
        fp6=("abc",), seed=1.5, retriable="yes", tokens_out=True,
    )
    (rec,) = records(out)
    assert secret not in out.getvalue()
    assert rec["dropped_fields"] == 12
    assert rec["human"] == "Job ? started."  # the template cannot reach a dropped value
    assert not {"prompt", "text", "token", "tokens", "job_id", "tokens_in", "error", "seed"} & set(rec)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("error", "e" * 5000, "e" * 999 + "…"),
        ("job_id", "j" * 300, "j" * 199 + "…"),
        ("callback_url", "https://user:pw@pm.example:9443/v2/x?token=abc#frag", "https://pm.example:9443/v2/x"),
        ("uri", "http://[::1]:8001", "http://[::1]:8001"),
        ("uri", "no-scheme/path", "(relative URL)"),
        ("state", ErrorCode.CANCELLED, "CANCELLED"),  # enums log as their value
        ("temperature", float("nan"), None),
        ("tokens_in", 12, 12),
        ("tokens_in", False, None),
        ("dev_mode", 1, None),
    ],
)
def test_worker_4802_values_are_bounded_and_urls_lose_credentials(key: str, value: Any, expected: Any) -> None:
    assert logs.clean(key, value) == expected


def test_worker_4802_template_is_filled_only_from_allowed_fields() -> None:
    values = {"job_id": "j1", "decode_time_ms": 12.345, "error": "{tokens_in}"}
    assert logs.render("Job {job_id}: {decode_time_ms:.1f} ms", values) == "Job j1: 12.3 ms"
    assert logs.render("{tokens_out} tokens", values) == "? tokens"
    assert logs.render("bad spec {decode_time_ms:%Q}", values) == "bad spec 12.345"
    assert logs.render("{error}", values) == "{tokens_in}"  # a value is never re-parsed as a template
    # Anything but a plain allowed field name keeps the template verbatim, never evaluated:
    for template in ("{job_id.__class__}", "{job_id[0]}", "{prompt}", "got {'a': 1}", "unbalanced {", "{0}"):
        assert logs.render(template, values) == template


def test_worker_4802_untyped_exception_logs_type_and_frames_never_its_text(out: io.StringIO) -> None:
    def engine_step() -> None:
        raise KeyError("SECRET-TOKEN-TEXT")

    try:
        try:
            engine_step()
        except KeyError as inner:
            raise RuntimeError("SECRET-OUTER") from inner
    except RuntimeError as e:
        logs.event("internal_error", "Unexpected {exc_type} in the engine.", level=logging.ERROR, exc=e)
    (rec,) = records(out)
    assert "SECRET" not in out.getvalue()
    assert rec["exc_type"] == "RuntimeError" and rec["human"] == "Unexpected RuntimeError in the engine."
    assert "caused by:\nKeyError" in rec["traceback"] and "in engine_step" in rec["traceback"]


def test_worker_4802_worker_error_message_is_kept(out: io.StringIO) -> None:
    try:
        raise WorkerError("CUDA error: an illegal memory access was encountered", code=ErrorCode.CUDA_ERROR)
    except WorkerError as e:
        logs.event("fatal", "Fatal {code}: {error}.", level=logging.ERROR, exc=e)
    (rec,) = records(out)
    assert rec["code"] == "CUDA_ERROR" and rec["human"] == "Fatal CUDA_ERROR: CUDA error: an illegal memory access was encountered."


def test_worker_4802_other_libraries_text_is_withheld_trusted_loggers_kept() -> None:
    fmt = logs.JsonFormatter({"worker_id": "w"})
    foreign = json.loads(fmt.format(record_for("somelib.client", logging.WARNING, ValueError("SECRET-VALUE"))))
    assert foreign["event"] == "log" and foreign["logger"] == "somelib.client" and foreign["exc_type"] == "ValueError"
    assert "withheld" in foreign["human"] and "SECRET" not in json.dumps(foreign) and "argument" not in foreign["human"]
    trusted = json.loads(fmt.format(record_for("uvicorn.error")))
    assert trusted["human"] == "message with an argument" and trusted["worker_id"] == "w"


def test_worker_4802_configure_disables_access_log_and_catches_stray_warnings(out: io.StringIO) -> None:
    access = logging.getLogger("uvicorn.access")
    assert access.disabled and not access.propagate  # it would print request lines with query strings
    assert not any(isinstance(hd.formatter, logs.JsonFormatter) for hd in access.handlers)
    fallback = logging.lastResort
    assert fallback is not None and isinstance(fallback.formatter, logs.JsonFormatter)
    assert fallback.level == logging.WARNING


def test_worker_4802_every_call_site_passes_a_literal_template() -> None:
    """The narration is a template over allowed fields: no f-string can smuggle a value into it."""
    violations: dict[str, list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _is_logs_event(node.func)):
                continue
            human = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "human"), None)
            if not (node.args and _literal(node.args[0]) and human is not None and _literal(human)):
                violations.setdefault(str(path.relative_to(PACKAGE)), []).append(node.lineno)
    assert set(violations) <= PENDING_LITERAL_TEMPLATES, violations
    converted = PENDING_LITERAL_TEMPLATES - set(violations)
    assert not converted, f"{converted} now pass: remove them from PENDING_LITERAL_TEMPLATES"


def _is_logs_event(func: ast.expr) -> bool:
    return isinstance(func, ast.Attribute) and func.attr == "event" and isinstance(func.value, ast.Name) and func.value.id == "logs"


def _literal(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.IfExp):
        return _literal(node.body) and _literal(node.orelse)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal(node.left) and _literal(node.right)
    return False


# --- request context (4801) ----------------------------------------------------------------


def test_worker_4801_context_follows_tasks_and_request_threads_only(out: io.StringIO) -> None:
    async def request(cid: str) -> None:
        token = logs.bind(correlation_id=cid)
        try:
            await asyncio.sleep(0)
            logs.event("in_task", "In the request task.")
            ctx = contextvars.copy_context()
            t = threading.Thread(target=ctx.run, args=(logs.event, "in_thread", "On the request's thread."))
            t.start()
            t.join()
        finally:
            logs.reset(token)

    async def main() -> None:
        await asyncio.gather(request("c-a"), request("c-b"))
        logs.event("outside", "Outside any request.")

    asyncio.run(main())
    recs = records(out)
    by = {(r["event"], r.get("correlation_id")) for r in recs}
    assert {("in_task", "c-a"), ("in_task", "c-b"), ("in_thread", "c-a"), ("in_thread", "c-b"), ("outside", None)} == by


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHarness]:
    with WorkerHarness(tmp_path_factory.mktemp("logs"), Knobs(step_s=0.01)) as harness:
        yield harness


def lines(h: WorkerHarness) -> list[dict[str, Any]]:
    return [json.loads(line) for line in h.log_lines()]


def test_worker_4801_every_line_of_a_request_carries_its_correlation_id(h: WorkerHarness) -> None:
    before = len(h.log_lines())
    with h.client().stream(
        "POST", "/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 3}}, headers={"X-Correlation-Id": "corr-4801"}
    ) as r:
        events = list(iter_events(r))
    assert r.headers["x-correlation-id"] == "corr-4801" and events[0][1]["correlation_id"] == "corr-4801"
    job_id = events[0][1]["job_id"]
    for _ in range(100):  # the request line is written after the last byte went out
        if any(rec.get("event") == "http_request" and rec.get("job_id") == job_id for rec in lines(h)[before:]):
            break
        threading.Event().wait(0.01)
    mine = [rec for rec in lines(h)[before:] if rec.get("job_id") == job_id or rec.get("correlation_id") == "corr-4801"]
    assert {"state", "execute_start", "execute_end", "http_request"} <= {rec["event"] for rec in mine}
    assert all(rec.get("correlation_id") == "corr-4801" and rec.get("fp6") for rec in mine), mine
    generated = h.client(None).get("/health")
    assert len(generated.headers["x-correlation-id"]) == 32


def test_worker_4801_invalid_correlation_id_refused_and_counted(h: WorkerHarness) -> None:
    r = h.client().get("/worker/ready", headers={"X-Correlation-Id": "two words"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_PARAMS" and r.json()["message"].startswith("X-Correlation-Id: ")
    assert len(r.headers["x-correlation-id"]) == 32  # the refusal itself still carries a (generated) id
    assert "two words" not in h.log.getvalue()


def test_worker_4802_request_target_never_logged_raw(h: WorkerHarness) -> None:
    h.client().get(f"/worker/{TOKEN_A}?access_token={TOKEN_A}")
    h.client().get(f"/metrics?access_token={TOKEN_A}")
    text = h.log.getvalue()
    assert TOKEN_A not in text and "access_token" not in text
    assert any(rec.get("path") == "(unmatched)" and rec.get("status") == 404 for rec in lines(h))


# --- narration (4803, 4820-4822) -----------------------------------------------------------


def test_worker_4820_key_points_are_narrated_in_sentences(h: WorkerHarness) -> None:
    with h.client().stream("POST", "/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 60}, "job_id": "narrate"}) as r:
        it = iter_events(r)
        assert next(it)[0] == "started"
        assert h.client().post("/cancel", json={"job_id": "narrate"}).status_code == 202
        list(it)
    h.client().post("/worker/execute", json={"prompt": "abc", "params": {"max_tokens": 2}})
    narrated = {rec["event"]: rec["human"] for rec in lines(h)}
    for name in ("startup", "device_open", "model_digest", "sealed", "ready", "execute_start", "execute_end", "job_cancel", "execute_error"):
        human = narrated[name]
        assert human.endswith(".") and len(human.split()) >= 5 and "?" not in human, (name, human)
    assert narrated["sealed"].startswith("Loaded tiny.gguf (") and "sealed it as shard w-test-shard0" in narrated["sealed"]
    assert "cancel" in narrated["job_cancel"].lower() and "CANCELLED" in narrated["execute_error"]
