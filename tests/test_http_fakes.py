"""A fake engine + an in-process worker harness for the HTTP-layer unit tests.

The fake implements the engine's Protocols (engine/interface.py) without torch so
the HTTP tests run in milliseconds: a byte-level "echo" model (token = byte + 3,
so a 4-byte emoji spans 4 tokens and exercises the UTF-8-safe detokenizer), a
resident fingerprint a test can corrupt (the host's real ``Sealer`` seals and
verifies it), and knobs for slow prefill, slow decode and failures. Everything else is real: the loader
validates a real tiny GGUF, serve() runs uvicorn on a real socket, and the
callbacks go to a real HTTP server. The integration test
(test_serve_integration.py) runs the real engine on the real model.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

import httpx
import pytest

from worker_orcd import logs
from worker_orcd.config import load_config
from worker_orcd.errors import ErrorCode, ModelLoadError, WorkerError
from worker_orcd.gguf import GGMLType
from worker_orcd.gguf.writer import GGUFWriter, tensor_nbytes
from worker_orcd.lifecycle import EngineBinding, State, Worker
from worker_orcd.serve import serve
from worker_orcd.tokenizer import StreamingDetokenizer
from worker_orcd.engine.events import GenerationEnd, SamplingParams, TokenEvent

TOKEN_A = "tok-A-" + "a" * 32
TOKEN_B = "tok-B-" + "b" * 32
FINGERPRINT = "f" * 64
BYTE_OFFSET = 3  # ids 0..2 are specials: 0 pad, 1 eos, 2 bos
EOS = 1
MODEL_NAME = "tiny.gguf"


def write_tiny_model(path: Path) -> Path:
    """A tiny llama GGUF (gqa, 512 context) the real loader accepts and the ECP matches."""
    w = GGUFWriter()
    for key, value in {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": 1,
        "llama.context_length": 512,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "tokenizer.ggml.tokens": ["a", "b"],
    }.items():
        w.add(key, value)
    n = tensor_nbytes((256, 2), GGMLType.Q8_0)
    w.add_tensor("token_embd.weight", (256, 2), GGMLType.Q8_0, (bytes(range(256)) * (n // 256 + 1))[:n])
    return w.write(path)


# --- the fake engine (real event types from the torch-free worker_orcd.engine.events) ---------


class ByteTokenizer:
    """Token = one UTF-8 byte + 3: multi-byte characters always span several tokens."""

    special_ids = frozenset({0, 1, 2})
    strips_leading_space = False
    eos_ids = frozenset({EOS})
    eos_id, bos_id, vocab_size = EOS, 2, 256 + BYTE_OFFSET
    chat_template = None  # the OpenAI tests pass --chat-template

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return b"<eos>" if token_id == EOS else b""
        return bytes([token_id - BYTE_OFFSET])

    def stream(self, skip_special: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special=skip_special)  # type: ignore[arg-type]


@dataclass
class Knobs:
    """What the fake engine does; tests change these (also while the worker runs)."""

    step_s: float = 0.005  # per decode step
    prefill_s: float = 0.0
    max_seq_len: int = 256
    fail_at: int | None = None  # raise a RuntimeError (or fail_with) before this token index
    fail_with: Exception | None = None  # e.g. a CUDA_ERROR WorkerError, as the real engine raises it
    eos_after: int | None = None  # emit EOS as token number N (0-based)
    load_error: WorkerError | None = None
    load_gate: threading.Event | None = None  # set: the load (half uploaded) may finish; a test watches it meanwhile
    load_bytes: int = 1000  # the tensor bytes the fake upload reports
    vram_total: int = 8 << 30
    active: int = 0  # generations running right now
    max_active: int = 0  # most ever running at once (must stay 1)
    generations: int = 0
    cancel_seen_at: list[float] = field(default_factory=list)  # when generate() observed the cancel flag
    params_seen: list[SamplingParams] = field(default_factory=list)  # what each generate() was given


class _Computed:
    """A fingerprint computed at once (the fake has no device to run it beside anything)."""

    def __init__(self, value: str) -> None:
        self.value = value

    def ready(self) -> bool:
        return True

    def __call__(self) -> str:
        return self.value


class FakeResident:
    """A ResidentModelLike (engine/interface.py): one generation thread per job, no batching."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.resident_fingerprint = FINGERPRINT  # a test sets another value: the "VRAM" changed
        self.closed = False
        self._lock = threading.Lock()

    @property
    def max_seq_len(self) -> int:
        return self.knobs.max_seq_len

    @property
    def max_batch(self) -> int:
        return 1

    @property
    def gpu_device(self) -> int:
        return 0

    @property
    def seals_per_step(self) -> bool:
        return False  # the host verifies the seal before every request

    def stats(self) -> dict[str, int]:
        return {"running": self.knobs.active, "waiting": 0, "max_batch": 1}

    def generate_into(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None,
        sink: Callable[[Any], None],
    ) -> None:
        events = self.generate(prompt_ids, params, cancel)  # refused at the call, as the engine does

        flush = getattr(sink, "flush", lambda: None)

        def run() -> None:
            try:
                for event in events:
                    sink(event)
                    flush()  # a step per token here
            except BaseException as e:  # noqa: BLE001 - the engine hands its failure to the sink
                sink(e)
                flush()

        threading.Thread(target=run, name="fake-engine", daemon=True).start()

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[Any]:
        self.knobs.params_seen.append(params)
        if len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise WorkerError("capacity exceeded", code=ErrorCode.INVALID_PARAMS)
        return self._run(list(prompt_ids), params, cancel or threading.Event())

    def _run(self, ids: list[int], p: SamplingParams, cancel: threading.Event) -> Iterator[Any]:
        k = self.knobs
        with self._lock:
            k.active += 1
            k.generations += 1
            k.max_active = max(k.max_active, k.active)
        try:
            t0 = time.perf_counter()
            time.sleep(k.prefill_s)
            rng = random.Random(p.seed)
            t_first = time.perf_counter()
            n_out = 0

            def end(reason: str) -> GenerationEnd:
                now = time.perf_counter()
                return GenerationEnd(len(ids), n_out, reason, (t_first - t0) * 1e3, (t_first - t0) * 1e3, (now - t_first) * 1e3)

            for i in range(p.max_tokens):
                if i:
                    time.sleep(k.step_s)
                if cancel.is_set():
                    k.cancel_seen_at.append(time.monotonic())
                    yield end("cancelled")
                    return
                if k.fail_at is not None and i >= k.fail_at:
                    raise k.fail_with or RuntimeError("secret internal detail /dev/nvidia0 0xdeadbeef")
                if k.eos_after is not None and i == k.eos_after:
                    tok = EOS
                elif p.temperature == 0.0:
                    tok = ids[i % len(ids)]  # greedy "echo"
                else:
                    tok = rng.choice(ids)
                n_out += 1
                yield TokenEvent(i, tok)
                if tok in p.stop_ids:
                    yield end("eos")
                    return
            yield end("max_tokens")
        finally:
            with self._lock:
                k.active -= 1

    def fingerprint(self) -> str:
        return self.resident_fingerprint

    def fingerprint_start(self, *, beside_steps: bool = False) -> "_Computed":
        return _Computed(self.resident_fingerprint)

    def attest(self) -> dict[str, Any]:
        return {"resident": False, "status": "fake"}

    def vram_bytes(self) -> int:
        return 123_456

    def follow(self, before_job: Any = None) -> str:
        raise AssertionError("the HTTP tests run no tensor-parallel member")

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class FakePlan:
    required_bytes: int
    free_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"required_bytes": self.required_bytes, "free_bytes": self.free_bytes, "dtype": "fake"}


class FakeEngine:
    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.models: list[FakeResident] = []
        self.closed = False

    def plan(self, gguf: Any, kv_cache_mb: int | None = None, *, tp_degree: int = 1) -> FakePlan:
        return FakePlan(required_bytes=1 << 20, free_bytes=self.knobs.vram_total)

    def load(
        self, gguf: Any, model_file: BinaryIO, *, digest: str | None = None, on_digest: Any = None,
        name: str = "model", kv_cache_mb: int | None = None,
        max_batch: int | None = None, prefill_chunk: int | None = None, mixed_step_tokens: int | None = None,
        before_admit: Any = None, observer: Any = None, progress: Any = None, on_fatal: Any = None,
        seal_check_interval_ms: float = 0.0,
    ) -> FakeResident:
        k = self.knobs
        # the device is faked, the file's digest is not: the real engine's contract (api.Engine.load)
        assert (digest is None) != (on_digest is None), "load takes a digest or an on_digest check"
        streamed = hashlib.sha256(model_file.read()).hexdigest()
        if digest is not None and streamed != digest:
            raise ModelLoadError(f"model bytes changed after verification: {streamed} vs {digest}")
        if on_digest is not None:
            on_digest(streamed)
        total = k.load_bytes
        if progress is not None:
            progress(0, total)
            progress(total // 2, total)
        if k.load_gate is not None:
            assert k.load_gate.wait(30), "the test never let the load finish"
        if k.load_error is not None:
            raise k.load_error
        if progress is not None:
            progress(total, total)
        resident = FakeResident(self.knobs)
        self.models.append(resident)
        return resident

    def memory(self) -> dict[str, int]:
        return {"free_bytes": self.knobs.vram_total, "total_bytes": self.knobs.vram_total}

    def abandon_group(self, reason: str) -> bool:
        self.abandoned = reason  # the fake is never in a group
        return False

    def close(self) -> None:
        self.closed = True


def fake_binding(knobs: Knobs, engines: list[FakeEngine] | None = None) -> EngineBinding:
    def open_engine() -> FakeEngine:
        engine = FakeEngine(knobs)
        if engines is not None:
            engines.append(engine)
        return engine

    return EngineBinding(open=open_engine, sampling_params=SamplingParams, tokenizer=lambda gguf: ByteTokenizer())


# --- the in-process worker ----------------------------------------------------------------


class WorkerHarness:
    """serve() on a thread with the fake engine, a real socket, a real token file and real logs."""

    def __init__(
        self, tmp: Path, knobs: Knobs | None = None, *, model: bool | str = True, tokens: Sequence[str] = (TOKEN_A, TOKEN_B),
        wait_ready: bool = True, **overrides: Any,
    ) -> None:
        self.tmp = tmp
        self.wait_ready = wait_ready
        self.knobs = knobs or Knobs()
        self.engines: list[FakeEngine] = []
        self.root = tmp / "models"
        self.root.mkdir(exist_ok=True)
        self.model_path = write_tiny_model(self.root / MODEL_NAME)
        token_file = tmp / "token"
        token_file.write_text("\n".join(tokens) + "\n")
        token_file.chmod(0o600)  # SPEC 4913: a token file others can read is refused
        flags: dict[str, Any] = {
            "worker_id": "w-test", "device": "cpu", "bind": "127.0.0.1:0", "model_root": str(self.root),
            "api_token_file": str(token_file), "shutdown_timeout_sec": 5, "sse_keepalive_sec": 1,
            "model": (model if isinstance(model, str) else MODEL_NAME) if model else None,
        }
        flags.update(overrides)
        self.config = load_config(flags, env={})
        self.log = io.StringIO()
        self.worker: Worker | None = None
        self.exit_code: int | None = None
        self.forced: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="worker-under-test", daemon=True)

    def _run(self) -> None:
        def capture(worker: Worker) -> None:
            self.worker = worker
            self._loop = asyncio.get_running_loop()

        self.exit_code = asyncio.run(
            serve(self.config, fake_binding(self.knobs, self.engines), force_exit=self.forced.append, on_worker=capture)
        )

    def __enter__(self) -> Self:
        logs.configure("debug", stream=self.log, worker_id=self.config.worker_id, gpu_device=0, device="cpu")
        self._thread.start()
        deadline = time.monotonic() + 20
        want = State.READY if self.config.model and self.wait_ready else None
        while time.monotonic() < deadline and self._thread.is_alive():
            w = self.worker
            if w is not None and w.uri is not None and (want is None or w.state == want) and self._answers():
                break
            time.sleep(0.01)
        return self

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.shutdown()
            self.join(15)

    @property
    def url(self) -> str:
        assert self.worker is not None and self.worker.uri is not None, "worker did not start listening"
        return self.worker.uri

    def client(self, token: str | None = TOKEN_A, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 10), **kw)

    def shutdown(self) -> None:
        assert self._loop is not None and self.worker is not None
        self._loop.call_soon_threadsafe(self.worker.request_shutdown, "test")

    def join(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "serve() did not return in time"
        return self.exit_code

    def log_lines(self) -> list[str]:
        return [line for line in self.log.getvalue().splitlines() if line]


def iter_events(resp: httpx.Response) -> Iterator[tuple[str, Any]]:
    """SSE events as (name, data) while they arrive; comment lines come out as ("comment", text)."""
    event: str | None = None
    for line in resp.iter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            assert event is not None, "data line without an event line"
            yield event, json.loads(line[len("data: "):])
            event = None


# --- the fake keeps the engine's contract: each check runs on the fake AND on the real engine ------
# (CPU mode, a tiny synthetic model), so the HTTP tests above stand on what the engine really does.


@pytest.fixture(scope="module", params=["fake", "engine"])
def resident(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if request.param == "fake":
        yield FakeResident(Knobs(step_s=0.001, max_seq_len=64))
        return
    from synthetic import synth

    from worker_orcd.engine.api import Engine
    from worker_orcd.loader import LoadOptions, validate_model
    from worker_orcd.residency import load_resident

    path = synth().write_synthetic_model(tmp_path_factory.mktemp("contract") / "tiny.gguf", "tiny-qwen2", "Q8_0")
    vm = validate_model(str(path), LoadOptions(model_root=path.parent))
    model = load_resident(Engine.open("cpu"), vm, kv_cache_mb=1)
    yield model
    model.close()


CONTRACT_PROMPT = [10, 11, 12]


def _events(resident: Any, params: SamplingParams, cancel: Any = None) -> list[Any]:
    return list(resident.generate(CONTRACT_PROMPT, params, cancel or threading.Event()))


def test_contract_tokens_then_one_end_with_counts(resident: Any) -> None:
    events = _events(resident, SamplingParams(max_tokens=5))
    assert [type(e).__name__ for e in events] == ["TokenEvent"] * 5 + ["GenerationEnd"]
    assert [e.index for e in events[:-1]] == list(range(5))
    end = events[-1]
    assert (end.tokens_in, end.tokens_out, end.stop_reason) == (3, 5, "max_tokens")


def test_contract_stop_id_is_streamed_last_with_reason_eos(resident: Any) -> None:
    toks = [e.token_id for e in _events(resident, SamplingParams(max_tokens=6))[:-1]]
    stop = toks[2]
    events = _events(resident, SamplingParams(max_tokens=6, stop_ids=frozenset({stop})))
    assert [e.token_id for e in events[:-1]] == toks[: toks.index(stop) + 1]
    assert events[-1].stop_reason == "eos" and events[-1].tokens_out == toks.index(stop) + 1


def test_contract_stops_within_one_step_of_cancel(resident: Any) -> None:
    cancel = threading.Event()
    events = []
    for ev in resident.generate(CONTRACT_PROMPT, SamplingParams(max_tokens=50), cancel):
        events.append(ev)
        if len(events) == 3:
            cancel.set()
    assert [type(e).__name__ for e in events] == ["TokenEvent"] * 3 + ["GenerationEnd"]
    assert events[-1].stop_reason == "cancelled"


def test_contract_over_capacity_refused_at_the_call(resident: Any) -> None:
    """Refused when generate() is called, before any work: the route maps it to INVALID_PARAMS."""
    with pytest.raises(WorkerError) as e:
        resident.generate([10] * resident.max_seq_len, SamplingParams(max_tokens=1), threading.Event())
    assert e.value.code == ErrorCode.INVALID_PARAMS


# --- the real detokenizer on the fake's byte vocabulary ------------------------------------------


def test_byte_tokenizer_round_trips_multibyte_text() -> None:
    """StreamingDetokenizer (the product's) holds back an incomplete UTF-8 sequence, never splits it."""
    tok = ByteTokenizer()
    text = "héllo 🙂 世界"
    ids = tok.encode(text)
    stream = tok.stream(skip_special=True)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all(p == "" or "\ufffd" not in p for p in pieces)
    assert "" in pieces  # the emoji's first bytes were held back, not split
