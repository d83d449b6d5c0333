"""The engine process: the real Engine, its models and their batching loops, served over a Channel.

Started by ``proxy.ProcessEngine.open`` as ``python -m worker_orcd.engine_process.child MSG_FD FILE_FD``.
Everything the GPU layer does happens here, so the engine loop's Python never waits for the
GIL behind the HTTP side's (SSE frames, JSON, detokenising). Host policy stays in the worker: a
one-pass load asks it to check the digest (``on_digest``), a seal check sends it the fingerprint
the device computed (``seal``) and admits the jobs only once it answered. Each engine step ends
in one ``step`` note: every row's token or end, the loop's telemetry and its counters.

The process ignores SIGINT/SIGTERM/SIGHUP (a service manager signals the whole group; the worker
drains first and closes its engine) and exits when the worker's end of the socket closes.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..engine.events import SamplingParams
from ..errors import ErrorCode, WorkerError
from ..gguf import GGUFFile
from .channel import Channel
from .wire import encode_error, encode_event

log = logging.getLogger("worker_orcd.engine_process")


class _Outbox:
    """One model's events between two step notes; ``flush`` (every job sink's) sends what is queued."""

    def __init__(self, channel: Channel, rid: int, stats: Callable[[], dict[str, int]]) -> None:
        self._channel = channel
        self._rid = rid
        self._stats = stats
        self._lock = threading.Lock()
        self._events: list[tuple[Any, ...]] = []
        self._obs: list[tuple[Any, ...]] = []

    def event(self, item: tuple[Any, ...]) -> None:
        with self._lock:
            self._events.append(item)

    def observed(self, item: tuple[Any, ...], send: bool = False) -> None:
        with self._lock:
            self._obs.append(item)
        if send:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._events and not self._obs:
                return
            events, self._events = self._events, []
            obs, self._obs = self._obs, []
            self._channel.note("step", self._rid, events, obs, self._stats(), time.monotonic())


class _Observer:
    """The loop's observer here: records what the worker's observer hears; a step's end sends the note."""

    def __init__(self, out: _Outbox) -> None:
        self._out = out

    def step(self, rows: int, tokens: int, running: int, waiting: int, blocks_used: int, blocks_total: int,
             interval_ms: float | None = None) -> None:
        self._out.observed(("step", rows, tokens, running, waiting, blocks_used, blocks_total, interval_ms), send=True)

    def admitted(self, queue_ms: float) -> None:
        self._out.observed(("admitted", queue_ms))

    def preempted(self) -> None:
        self._out.observed(("preempted",))


class _Sink:
    __slots__ = ("_jid", "_out", "_server", "flush")

    def __init__(self, jid: int, out: _Outbox, server: EngineServer) -> None:
        self._jid, self._out, self._server = jid, out, server
        self.flush = out.flush  # one object for every job of the model: the loop calls it once per step

    def __call__(self, item: Any) -> None:
        self._out.event(encode_event(self._jid, item))
        if not hasattr(item, "index"):  # an end or an error: the job is gone
            self._server.cancels.pop(self._jid, None)


class _SealCheck:
    """The loop's seal check: the fingerprint on this device, the verdict from the worker's seal."""

    def __init__(self, pending: Any, channel: Channel, token: int, jobs: int, beside_steps: bool) -> None:
        self._pending, self._channel = pending, channel
        self._args = (token, jobs, beside_steps)

    def ready(self) -> bool:
        return bool(self._pending.ready())

    def __call__(self) -> None:
        fingerprint = self._pending()
        self._channel.call("seal", *self._args, fingerprint)


class _Model:
    def __init__(self, resident: Any, gguf: GGUFFile, out: _Outbox) -> None:
        self.resident, self.gguf, self.out = resident, gguf, out
        self._structured: Any = None
        self._lock = threading.Lock()

    def constraint(self, grammar: str) -> Any:
        """A grammar matcher built here from the model's own tokenizer (the worker compiled it once to validate)."""
        with self._lock:
            if self._structured is None:
                from ..structured_output import StructuredOutput
                from ..tokenizer import GGUFTokenizer

                self._structured = StructuredOutput(GGUFTokenizer.from_gguf(self.gguf), self.resident.config.vocab_size)
        return self._structured.compile(grammar)


class EngineServer:
    def __init__(self, conn: Connection, files: socket.socket) -> None:
        self._files = files
        self.engine: Any = None
        self.models: dict[int, _Model] = {}
        self.cancels: dict[int, threading.Event] = {}
        self.main_queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._next_rid = 0
        self.channel = Channel(
            conn,
            calls={
                "open": self.open, "plan": self.plan, "load": self.load, "memory": self.memory,
                "abandon_group": self.abandon_group, "close": self.close, "drop_privileges": self.drop_privileges,
                "m_fingerprint": self.m_fingerprint, "m_attest": self.m_attest, "m_follow": self.m_follow,
                "m_close": self.m_close,
            },
            notes={"submit": self.submit, "cancel": self.cancel},
            name="engine-process-channel",
        )

    # --- the device ------------------------------------------------------------------------

    def open(self, device: str, gpu_device: int, resident_weights: str, log_level: int) -> dict[str, Any]:
        logging.getLogger().setLevel(log_level)
        from ..engine.api import Engine

        self.engine = Engine.open(device, gpu_device, resident_weights)  # type: ignore[arg-type]
        return {"pid": os.getpid()}

    def plan(self, gguf: GGUFFile, kv_cache_mb: int | None, tp_degree: int) -> tuple[int, int, dict[str, Any]]:
        p = self.engine.plan(gguf, kv_cache_mb, tp_degree=tp_degree)
        return int(p.required_bytes), int(p.free_bytes), p.as_dict()

    def memory(self) -> dict[str, int]:
        return dict(self.engine.memory())

    def abandon_group(self, reason: str) -> bool:
        return bool(self.engine.abandon_group(reason))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.models.clear()

    def drop_privileges(self, plan: Any) -> None:
        """On the main thread: the bounding set is per thread, and verify wants the main one's empty."""
        from .. import privileges

        self.on_main(lambda: privileges.drop(plan))

    def on_main(self, fn: Callable[[], Any]) -> Any:
        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            try:
                result.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 - raised on the calling thread
                result.append((False, e))
            done.set()

        self.main_queue.put(run)
        done.wait()
        ok, value = result[0]
        if not ok:
            raise value
        return value

    def serve_main(self) -> None:
        """The main thread runs what must run there until the channel ends."""
        while self.channel.alive:
            try:
                fn = self.main_queue.get(timeout=0.5)
            except queue.Empty:
                continue
            fn()

    def load(self, token: int, gguf: GGUFFile, digest: str | None, name: str, options: dict[str, Any],
             hooks: frozenset[str]) -> tuple[int, dict[str, Any]]:
        _, fds, _, _ = socket.recv_fds(self._files, 1, 1)
        if len(fds) != 1:
            raise WorkerError("the engine process did not receive the model file", code=ErrorCode.INTERNAL)
        self._next_rid += 1
        rid = self._next_rid
        ch = self.channel
        holder: dict[str, Any] = {}

        def before_admit(jobs: int, *, beside_steps: bool) -> _SealCheck:
            return _SealCheck(holder["model"].fingerprint_start(beside_steps=beside_steps), ch, token, jobs, beside_steps)

        out = _Outbox(ch, rid, lambda: holder["model"].stats() if "model" in holder else {})
        with os.fdopen(fds[0], "rb") as fh:
            resident = self.engine.load(
                gguf, fh, digest=digest, name=name,
                on_digest=(lambda d: ch.call("on_digest", token, d)) if "on_digest" in hooks else None,
                before_admit=before_admit if "before_admit" in hooks else None,
                observer=_Observer(out),
                progress=(lambda done, total: ch.note("progress", token, done, total)) if "progress" in hooks else None,
                on_fatal=(lambda err: ch.note("fatal", token, encode_error(err))) if "on_fatal" in hooks else None,
                **options,
            )
        holder["model"] = resident
        gc.collect()
        gc.freeze()  # as the worker's settle_heap: rare full collections scan only what serving makes
        self.models[rid] = _Model(resident, gguf, out)
        info = {
            "max_seq_len": resident.max_seq_len, "max_batch": resident.max_batch, "gpu_device": resident.gpu_device,
            "seals_per_step": resident.seals_per_step, "vocab_size": resident.config.vocab_size,
            "vram_bytes": resident.vram_bytes(), "stats": resident.stats(),
        }
        return rid, info

    # --- a model ---------------------------------------------------------------------------

    def _model(self, rid: int) -> _Model:
        m = self.models.get(rid)
        if m is None:
            raise WorkerError("that model was closed", code=ErrorCode.WORKER_NOT_READY)
        return m

    def m_fingerprint(self, rid: int) -> str:
        return str(self._model(rid).resident.fingerprint())

    def m_attest(self, rid: int) -> dict[str, Any]:
        return dict(self._model(rid).resident.attest())

    def m_follow(self, rid: int, token: int) -> str:
        ch = self.channel
        return str(self._model(rid).resident.follow(lambda: ch.call("before_job", token)))

    def m_close(self, rid: int) -> None:
        m = self.models.pop(rid, None)
        if m is not None:
            m.resident.close()
            m.out.flush()

    # --- jobs (notes: on the channel's reader thread, never blocking it) ----------------------

    def submit(self, rid: int, jid: int, prompt_ids: list[int], params: SamplingParams, grammar: str | None) -> None:
        m = self.models.get(rid)
        cancel = self.cancels.setdefault(jid, threading.Event())
        if m is None:
            self.cancels.pop(jid, None)
            self.channel.note("step", rid, [encode_event(jid, WorkerError(
                "that model was closed", code=ErrorCode.WORKER_NOT_READY))], [], {})
            return
        if grammar is None:
            self._submit(m, jid, prompt_ids, params, cancel)
            return

        def compile_then_submit() -> None:  # a grammar compiles in ms (the first builds the token trie, ~1 s)
            try:
                p = dataclasses.replace(params, constraint=m.constraint(grammar))
            except BaseException as e:  # noqa: BLE001 - the job learns why
                _Sink(jid, m.out, self)(e)
                m.out.flush()
                return
            self._submit(m, jid, prompt_ids, p, cancel)

        threading.Thread(target=compile_then_submit, name="engine-grammar", daemon=True).start()

    def _submit(self, m: _Model, jid: int, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event) -> None:
        sink = _Sink(jid, m.out, self)
        try:
            m.resident.generate_into(prompt_ids, params, cancel, sink)
        except BaseException as e:  # noqa: BLE001 - refused at submission: the job's first and last event
            sink(e)
            m.out.flush()

    def cancel(self, jid: int) -> None:
        ev = self.cancels.get(jid)
        if ev is not None:
            ev.set()


class _ForwardLogs(logging.Handler):
    """This process's log records go to the worker, which writes them with its own handlers (and its
    redaction: a logger outside the allow-list keeps its text withheld there, as in one process)."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:  # its type only: tracebacks can hold data
                text += f" ({type(record.exc_info[1]).__name__})"
            self._channel.note("log", record.name, record.levelno, text)
        except Exception:  # noqa: BLE001 - logging must never fail the engine
            pass


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    files = socket.socket(fileno=int(argv[1]))
    server = EngineServer(conn, files)
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(server.channel)]
    root.setLevel(logging.INFO)
    server.channel.start()
    server.serve_main()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the worker is gone or closed us: no interpreter teardown racing device threads
