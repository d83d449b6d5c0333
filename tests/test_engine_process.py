"""The engine in its own process (engine_process/): the wire, the channel, and the real engine behind it.

The process tests run the real Engine on the CPU in a real child process, on a tiny random-weight
model (ids only; the served real model goes through it in the integration tests), and compare
every stream with the same engine in this process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_orcd.engine.events import GenerationEnd, SamplingParams, TokenEvent
from worker_orcd.engine_process.channel import Channel
from worker_orcd.engine_process.proxy import ProcessEngine
from worker_orcd.engine_process.wire import decode_error, decode_event, encode_error, encode_event
from worker_orcd.errors import (
    CapabilityError, ErrorCode, InvalidParams, ModelLoadError, SealVerificationError, WorkerError,
)
from worker_orcd.gguf import parse_file

# --- wire -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [WorkerError, ModelLoadError, CapabilityError, InvalidParams, SealVerificationError])
def test_worker_errors_cross_with_class_code_and_hints(cls: type[WorkerError]) -> None:
    e = cls("why it failed", retry_after_ms=1234, detail="log only")
    back = decode_error(encode_error(e))
    assert type(back) is cls
    assert (back.code, back.message, back.retriable, back.retry_after_ms, back.detail) == (
        e.code, e.message, e.retriable, 1234, "log only")


def test_an_explicit_code_survives() -> None:
    back = decode_error(encode_error(WorkerError("busy", code=ErrorCode.WORKER_BUSY)))
    assert back.code is ErrorCode.WORKER_BUSY and back.retriable


def test_foreign_exceptions_become_internal_without_their_text() -> None:
    back = decode_error(encode_error(ValueError("/secret/path")))
    assert back.code is ErrorCode.INTERNAL and "/secret/path" not in back.message
    assert "ValueError" in (back.detail or "")
    assert decode_error(encode_error(MemoryError())).code is ErrorCode.HOST_OOM


@settings(max_examples=200, deadline=None)
@given(
    jid=st.integers(1, 2**62), index=st.integers(0, 2**31), token=st.integers(0, 2**31),
    logprob=st.none() | st.floats(allow_nan=False, max_value=0),
    top=st.lists(st.tuples(st.integers(0, 2**31), st.floats(allow_nan=False, max_value=0)), max_size=20).map(tuple),
)
def test_token_events_round_trip(jid: int, index: int, token: int, logprob: float | None, top: tuple[Any, ...]) -> None:
    ev = TokenEvent(index, token, logprob, top)
    assert decode_event(encode_event(jid, ev)) == (jid, ev)


def test_ends_round_trip() -> None:
    end = GenerationEnd(3, 7, "eos", 1.5, 2.5, 3.5, 0.25, 2)
    assert decode_event(encode_event(9, end)) == (9, end)
    jid, err = decode_event(encode_event(4, InvalidParams("bad")))
    assert jid == 4 and isinstance(err, InvalidParams) and err.message == "bad"


# --- channel ----------------------------------------------------------------------------------


def _pair(**kw_b: Any) -> tuple[Channel, Channel, dict[str, list[Any]]]:
    a_sock, b_sock = socket.socketpair()
    seen: dict[str, list[Any]] = {"a_notes": [], "b_notes": [], "a_closed": [], "b_closed": []}

    def refuse(x: int) -> int:
        raise InvalidParams(f"no {x}")

    a = Channel(Connection(a_sock.detach()), calls={"double": lambda x: 2 * x},
                notes={"n": lambda *x: seen["a_notes"].append(x)}, on_closed=lambda: seen["a_closed"].append(1))
    b = Channel(Connection(b_sock.detach()),
                calls={"triple": lambda x: 3 * x, "refuse": refuse, "ask_back": lambda x: a_call(x), **kw_b},
                notes={"n": lambda *x: seen["b_notes"].append(x)}, on_closed=lambda: seen["b_closed"].append(1))

    def a_call(x: int) -> int:
        return int(b.call("double", x))  # b calls a while a waits on b: calls run on their own threads

    a.start()
    b.start()
    return a, b, seen


def test_calls_both_ways_notes_in_order_and_typed_errors() -> None:
    a, b, seen = _pair()
    try:
        assert a.call("triple", 5) == 15
        assert b.call("double", 4) == 8
        assert a.call("ask_back", 21) == 42
        with pytest.raises(InvalidParams, match="no 3"):
            a.call("refuse", 3)
        for i in range(100):
            a.note("n", i)
        deadline = time.monotonic() + 5
        while len(seen["b_notes"]) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen["b_notes"] == [(i,) for i in range(100)]
    finally:
        a.close()
        b.close()


def test_a_closed_end_fails_pending_calls_and_reports_once() -> None:
    release = threading.Event()
    a, b, seen = _pair(slow=lambda: release.wait(10))
    result: list[BaseException] = []

    def waiting() -> None:
        try:
            a.call("slow")
        except WorkerError as e:
            result.append(e)

    t = threading.Thread(target=waiting)
    t.start()
    time.sleep(0.2)
    b.close()  # the other side goes away with a call in flight
    t.join(5)
    release.set()
    assert result and result[0].code is ErrorCode.INTERNAL
    a.join(5)
    assert seen["a_closed"] == [1]
    with pytest.raises(WorkerError, match="exited"):
        a.call("triple", 1)
    a.note("n", 1)  # a note to a closed end is dropped, never raised


def test_a_call_times_out() -> None:
    release = threading.Event()
    a, b, _ = _pair(slow=lambda: release.wait(10))
    try:
        with pytest.raises(WorkerError, match="did not answer"):
            a.call("slow", timeout=0.2)
    finally:
        release.set()
        a.close()
        b.close()


# --- the real engine in a child process (CPU development mode) ---------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synthetic import synth

    return synth().write_synthetic_model(tmp_path_factory.mktemp("engine-process") / "tiny.gguf", "tiny-qwen2", "F16")


class _Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[Any, ...]] = []
        self.admitted: list[float] = []
        self.channel_ms: list[float] = []
        self.fingerprints: list[str] = []
        self.fatal: list[WorkerError] = []


class _Observer:
    def __init__(self, rec: _Recorder) -> None:
        self._rec = rec

    def step(self, *a: Any) -> None:
        self._rec.steps.append(a)

    def admitted(self, queue_ms: float) -> None:
        self._rec.admitted.append(queue_ms)

    def preempted(self) -> None: ...

    def step_channel(self, ms: float) -> None:
        self._rec.channel_ms.append(ms)


def _load(engine: Any, path: Path, rec: _Recorder | None = None, seal: Any = None, **kw: Any) -> Any:
    gguf = parse_file(path)
    digests: list[str] = []
    with open(path, "rb") as fh:
        model = engine.load(gguf, fh, on_digest=digests.append, name="tiny", max_batch=4,
                            observer=_Observer(rec) if rec else None, before_admit=seal,
                            on_fatal=rec.fatal.append if rec else None, **kw)
    assert len(digests) == 1
    return model


class _Collector:
    """A job's sink: keeps every event; ``ended`` once the end (or an error) came. ``broken``: raises
    on every token, as a consumer with a bug would."""

    def __init__(self, broken: bool = False) -> None:
        self.events: list[Any] = []
        self.ended = threading.Event()
        self._broken = broken

    def __call__(self, ev: Any) -> None:
        self.events.append(ev)
        if not isinstance(ev, TokenEvent):
            self.ended.set()
        elif self._broken:
            raise RuntimeError("consumer bug")


def _run(model: Any, jobs: list[tuple[list[int], SamplingParams]], cancel: Any = None) -> list[list[Any]]:
    """Submit every job at once (one batch) and collect each one's events."""
    outs: list[list[Any]] = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def sink(i: int) -> Any:
        def put(ev: Any) -> None:
            outs[i].append(ev)
            if not isinstance(ev, TokenEvent):
                done.release()
        return put

    for i, (prompt, params) in enumerate(jobs):
        model.generate_into(prompt, params, cancel, sink(i))
    for _ in jobs:
        assert done.acquire(timeout=120), "a job never ended"
    return outs


JOBS = [
    ([1, 2, 3, 4], SamplingParams(max_tokens=12)),
    ([5, 6, 7, 8, 9, 10, 11], SamplingParams(max_tokens=9, temperature=0.8, top_k=40, seed=7)),
    ([12, 13], SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=123)),
    ([14] * 20, SamplingParams(max_tokens=6, repetition_penalty=1.3)),
]


@pytest.fixture(scope="module")
def remote(tiny: Path) -> Any:
    rec = _Recorder()

    def seal(jobs: int, *, beside_steps: bool) -> Any:
        pending = model.fingerprint_start(beside_steps=beside_steps)

        def check() -> None:
            rec.fingerprints.append(pending())
        return check

    engine = ProcessEngine.open("cpu", 0, "dense")
    model = _load(engine, tiny, rec, seal)
    yield engine, model, rec
    engine.close()


def test_streams_equal_the_engine_in_this_process(tiny: Path, remote: Any) -> None:
    from worker_orcd.engine.api import Engine

    _, model, rec = remote
    there = _run(model, JOBS)
    local_engine = Engine.open("cpu", 0, "dense")
    try:
        here = _run(_load(local_engine, tiny), JOBS)
    finally:
        local_engine.close()
    assert [[getattr(e, "token_id", None) for e in s] for s in there] == \
        [[getattr(e, "token_id", None) for e in s] for s in here]
    for s, (_, params) in zip(there, JOBS, strict=True):
        assert [e.index for e in s[:-1]] == list(range(params.max_tokens))
        assert isinstance(s[-1], GenerationEnd) and s[-1].stop_reason == "max_tokens"
    # telemetry and the seal check crossed too: the host's hook got the fingerprint the device computed
    assert rec.steps and rec.admitted
    # each step note carried the child's send time: one channel delay per step, on the host's clock
    assert len(rec.channel_ms) == len(rec.steps) and all(0.0 <= ms < 10_000 for ms in rec.channel_ms)
    assert rec.fingerprints and set(rec.fingerprints) == {model.fingerprint()}
    assert model.stats()["kv_blocks_total"] > 0 and model.stats()["running"] == 0


def test_cancel_flags_and_callables_stop_a_job(remote: Any) -> None:
    _, model, _ = remote
    flag = threading.Event()
    seen = 0
    for ev in model.generate([1, 2, 3], SamplingParams(max_tokens=200), flag):
        seen += 1
        if seen == 2:
            flag.set()
    assert isinstance(ev, GenerationEnd) and ev.stop_reason == "cancelled" and ev.tokens_out < 200
    sink = _Collector()
    model.generate_into([4, 5], SamplingParams(max_tokens=250), lambda: len(sink.events) >= 3, sink)  # a callable
    assert sink.ended.wait(60)
    assert sink.events[-1].stop_reason == "cancelled" and len(sink.events) < 251


def test_a_refused_job_and_a_broken_sink(remote: Any) -> None:
    _, model, _ = remote
    (bad,) = _run(model, [([1] * 8, SamplingParams(max_tokens=10**6))])
    assert len(bad) == 1 and isinstance(bad[0], InvalidParams)
    with pytest.raises(InvalidParams):
        next(model.generate([1], SamplingParams(max_tokens=10**6)))

    alone = _run(model, [JOBS[0]])
    broken = _Collector(broken=True)
    model.generate_into([1, 2], SamplingParams(max_tokens=250), None, broken)
    beside = _run(model, [JOBS[0]])  # the others are unaffected
    assert [e.token_id for e in beside[0][:-1]] == [e.token_id for e in alone[0][:-1]]
    assert broken.ended.wait(60)
    # the sink raised at its first token: nothing more was handed to it but the job's end, a cancel
    # the engine process acted on (the job did not run to its 250 tokens)
    tokens = [e for e in broken.events if isinstance(e, TokenEvent)]
    end = broken.events[-1]
    assert len(tokens) == 1 and isinstance(end, GenerationEnd)
    assert end.stop_reason == "cancelled" and end.tokens_out < 250


def test_plan_and_memory_come_from_the_engine_process(tiny: Path, remote: Any) -> None:
    engine, _, _ = remote
    plan = engine.plan(parse_file(tiny), 64)
    assert plan.required_bytes > 0 and plan.free_bytes > 0 and plan.as_dict()
    assert engine.memory()["total_bytes"] > 0


def test_a_refused_digest_refuses_the_load_and_the_process_stays(tiny: Path) -> None:
    engine = ProcessEngine.open("cpu", 0, "dense")
    try:
        gguf = parse_file(tiny)

        def refuse(digest: str) -> None:
            raise ModelLoadError(f"digest {digest[:8]} is not the expected one")

        with open(tiny, "rb") as fh, pytest.raises(ModelLoadError, match="not the expected one"):
            engine.load(gguf, fh, on_digest=refuse, name="tiny")
        model = _load(engine, tiny)
        assert len(_run(model, [JOBS[0]])[0]) == 13
    finally:
        engine.close()
    assert engine._proc.returncode == 0


def test_a_failed_seal_check_fails_the_jobs_it_covered(tiny: Path) -> None:
    engine = ProcessEngine.open("cpu", 0, "dense")
    try:
        def seal(jobs: int, *, beside_steps: bool) -> None:
            raise SealVerificationError("seal mismatch")

        model = _load(engine, tiny, seal=seal)
        (out,) = _run(model, [JOBS[0]])
        assert len(out) == 1 and isinstance(out[0], SealVerificationError)
    finally:
        engine.close()


def test_a_killed_engine_process_fails_every_job_and_is_fatal(tiny: Path) -> None:
    rec = _Recorder()
    engine = ProcessEngine.open("cpu", 0, "dense")
    model = _load(engine, tiny, rec)
    sink = _Collector()
    model.generate_into([1, 2, 3], SamplingParams(max_tokens=250), None, sink)
    deadline = time.monotonic() + 60
    while not sink.events and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(engine.pid, signal.SIGKILL)
    assert sink.ended.wait(10)
    assert isinstance(sink.events[-1], WorkerError) and sink.events[-1].code is ErrorCode.INTERNAL
    assert rec.fatal and rec.fatal[0].code is ErrorCode.INTERNAL
    with pytest.raises(WorkerError):
        model.generate_into([1], SamplingParams(max_tokens=1), None, sink)
    engine.close()  # after a crash: returns, nothing hangs


def test_signals_to_the_group_do_not_kill_the_engine_process(remote: Any) -> None:
    engine, model, _ = remote
    os.kill(engine.pid, signal.SIGTERM)  # systemd signals every process of the unit; the worker drains first
    os.kill(engine.pid, signal.SIGINT)
    time.sleep(0.2)
    assert len(_run(model, [JOBS[0]])[0]) == 13


DROP_PROBE = """
import sys
from pathlib import Path
from worker_orcd import privileges
from worker_orcd.engine_process.proxy import ProcessEngine

plan = privileges.DropPlan(privileges.lookup_account("nobody"))
privileges.harden_early(plan)  # as serve.py: before the device (the engine process) opens
engine = ProcessEngine.open("cpu", 0, "dense")
privileges.drop(plan)
engine.drop_privileges(plan)
status = Path(f"/proc/{engine.pid}/status").read_text()
uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
assert set(uids) == {str(plan.target.uid)}, uids
assert engine.memory()["total_bytes"] > 0  # and it still serves
engine.close()
print("dropped", engine._proc.returncode)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can drop to another user")
def test_the_engine_process_drops_privileges_with_the_worker() -> None:
    # in a fresh interpreter: hardening is for good, and this test process must stay root
    done = subprocess.run([sys.executable, "-c", DROP_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "dropped 0"
