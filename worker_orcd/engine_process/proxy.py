"""The worker's side of the engine process: an ``EngineLike`` whose engine runs in a child process.

Why a process (issue 8): in one process the engine loop's Python (scheduling, delivery, ~6.5 µs
per row per step) and the HTTP side's (an SSE frame per token per stream) share one GIL; on an
H200 the 0.5B engine alone serves 28,264 tok/s at 64 clients, over HTTP 10,375, with p99 token
gaps 2.7 vs 14.5 ms. With the engine here, the worker's Python only turns each step's one
message into the streams' events (``_on_step``, on the channel's reader thread).

What stays in the worker: the seal and every policy decision (``load`` forwards ``on_digest`` and
``before_admit``: the child computes, the worker decides), cancel flags (polled after every
step note and every 10 ms; a set flag is sent once), telemetry (the child's observer calls are
replayed on the worker's), and the model file (its descriptor is passed over the socket, so the
child reads exactly the file the worker opened and validated).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import Any, BinaryIO

from ..batching.loop import BeforeAdmit, Cancel, LoopObserver, _is_set, read_events
from ..engine.events import GenerationEnd, SamplingParams, TokenEvent
from ..errors import ErrorCode, InvalidParams, WorkerError
from ..gguf import GGUFFile
from .channel import Channel
from .wire import decode_error, decode_event

log = logging.getLogger("worker_orcd.engine_process")

CANCEL_POLL_S = 0.01  # while no step note arrives: how often cancel flags are looked at
EXIT_WAIT_S = 10.0


@dataclasses.dataclass
class _Job:
    sink: Callable[[Any], None]
    flush: Callable[[], None] | None
    cancel: Cancel
    cancel_sent: bool = False
    dead: bool = False  # its sink failed: cancelled, nothing more delivered


@dataclasses.dataclass
class _Hooks:
    on_digest: Callable[[str], None] | None
    before_admit: BeforeAdmit | None
    observer: LoopObserver | None
    progress: Callable[[int, int], None] | None
    on_fatal: Callable[[WorkerError], None] | None
    model: RemoteResident | None = None
    before_job: Callable[[], None] | None = None


@dataclasses.dataclass(frozen=True)
class RemotePlan:
    """``VramPlanLike`` computed in the engine process."""

    required_bytes: int
    free_bytes: int
    plan: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.plan)


class _Ready:
    """A fingerprint the engine process has already computed (a seal check's)."""

    def __init__(self, value: str) -> None:
        self._value = value

    def ready(self) -> bool:
        return True

    def __call__(self) -> str:
        return self._value


class _Background:
    """A fingerprint computed by a call in flight."""

    def __init__(self, fn: Callable[[], str]) -> None:
        self._done = threading.Event()
        self._value: str | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(fn,), name="engine-fingerprint", daemon=True).start()

    def _run(self, fn: Callable[[], str]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 - raised to whoever waits
            self._error = e
        finally:
            self._done.set()

    def ready(self) -> bool:
        return self._done.is_set()

    def __call__(self) -> str:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class ProcessEngine:
    """``EngineLike`` backed by ``python -m worker_orcd.engine_process.child``."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection, files: socket.socket) -> None:
        self._proc = proc
        self._files = files
        self._files_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._jobs: dict[int, _Job] = {}
        self._hooks: dict[int, _Hooks] = {}
        self._models: dict[int, RemoteResident] = {}
        self._closing = False
        self.channel = Channel(
            conn,
            calls={"on_digest": self._on_digest, "seal": self._seal, "before_job": self._before_job},
            notes={"step": self._on_step, "progress": self._on_progress, "fatal": self._on_fatal, "log": self._on_log},
            on_closed=self._on_closed, idle=self._poll_cancels, idle_s=CANCEL_POLL_S, name="engine-process-reader",
        )
        self.channel.start()

    @classmethod
    def open(cls, device: str = "cuda", gpu_device: int = 0, resident_weights: str = "dense") -> ProcessEngine:
        """Start the engine process and open the device in it (its errors are this call's)."""
        ours, theirs = socket.socketpair()
        files_ours, files_theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker_orcd.engine_process.child", str(theirs.fileno()), str(files_theirs.fileno())],
                pass_fds=(theirs.fileno(), files_theirs.fileno()), stdin=subprocess.DEVNULL, close_fds=True,
            )
        except OSError as e:
            for s in (ours, theirs, files_ours, files_theirs):
                s.close()
            raise WorkerError("cannot start the engine process", code=ErrorCode.INTERNAL, detail=str(e)) from None
        theirs.close()
        files_theirs.close()
        engine = cls(proc, Connection(ours.detach()), files_ours)
        try:
            level = logging.getLogger("worker_orcd").getEffectiveLevel()
            engine.channel.call("open", device, gpu_device, resident_weights, level)
        except BaseException:
            engine.close()
            raise
        return engine

    @property
    def pid(self) -> int:
        return self._proc.pid

    # --- EngineLike --------------------------------------------------------------------------

    def plan(self, gguf: GGUFFile, kv_cache_mb: int | None = None, *, tp_degree: int = 1) -> RemotePlan:
        required, free, plan = self.channel.call("plan", gguf, kv_cache_mb, tp_degree)
        return RemotePlan(required, free, plan)

    def load(
        self,
        gguf: GGUFFile,
        model_file: BinaryIO,
        *,
        digest: str | None = None,
        on_digest: Callable[[str], None] | None = None,
        name: str = "model",
        kv_cache_mb: int | None = None,
        max_batch: int | None = None,
        prefill_chunk: int | None = None,
        mixed_step_tokens: int | None = None,
        before_admit: BeforeAdmit | None = None,
        observer: LoopObserver | None = None,
        progress: Callable[[int, int], None] | None = None,
        on_fatal: Callable[[WorkerError], None] | None = None,
        seal_check_interval_ms: float = 0.0,
    ) -> RemoteResident:
        token = next(self._ids)
        hooks = _Hooks(on_digest, before_admit, observer, progress, on_fatal)
        self._hooks[token] = hooks
        flags = frozenset(k for k in ("on_digest", "before_admit", "progress", "on_fatal") if getattr(hooks, k) is not None)
        options = {"kv_cache_mb": kv_cache_mb, "max_batch": max_batch, "prefill_chunk": prefill_chunk,
                   "mixed_step_tokens": mixed_step_tokens, "seal_check_interval_ms": seal_check_interval_ms}
        try:
            with self._files_lock:  # the descriptor and the call that takes it, in one order
                try:
                    socket.send_fds(self._files, [b"F"], [model_file.fileno()])
                except OSError as e:
                    raise WorkerError("cannot hand the model file to the engine process", code=ErrorCode.INTERNAL,
                                      detail=str(e)) from None
                rid, info = self.channel.call("load", token, gguf, digest, name, options, flags)
        except BaseException:
            self._hooks.pop(token, None)
            raise
        model = RemoteResident(self, rid, token, info)
        hooks.model = model
        self._models[rid] = model
        return model

    def abandon_group(self, reason: str) -> bool:
        return bool(self.channel.call("abandon_group", reason))

    def memory(self) -> dict[str, int]:
        return dict(self.channel.call("memory"))

    def drop_privileges(self, plan: Any) -> None:
        """The worker dropped its privileges (serve.py): the engine process drops to the same account."""
        self.channel.call("drop_privileges", plan)

    def close(self) -> None:
        """Release the device (the engine's close), then end the process."""
        if self._closing:
            return
        self._closing = True
        try:
            if not self.channel.closed:
                self.channel.call("close", timeout=60.0)
        except WorkerError as e:
            log.warning("engine process: close failed: %s", e)
        finally:
            self.channel.close()
            self._files.close()
            try:
                self._proc.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("engine process %d did not exit within %g s; killed", self._proc.pid, EXIT_WAIT_S)
                self._proc.kill()
                self._proc.wait()
            self.channel.join(EXIT_WAIT_S)

    # --- jobs --------------------------------------------------------------------------------

    def submit(self, rid: int, prompt_ids: Sequence[int], params: SamplingParams, cancel: Cancel,
               sink: Callable[[Any], None]) -> None:
        grammar = None
        if params.constraint is not None:
            grammar = getattr(params.constraint, "grammar", None)
            if not isinstance(grammar, str):
                raise InvalidParams("this sampling constraint cannot be run by the engine process")
            params = dataclasses.replace(params, constraint=None)
        jid = next(self._ids)
        self._jobs[jid] = _Job(sink, getattr(sink, "flush", None), cancel)
        if self.channel.closed:
            self._jobs.pop(jid, None)
            raise WorkerError("the engine process exited", code=ErrorCode.INTERNAL)
        self.channel.note("submit", rid, jid, list(prompt_ids), params, grammar)

    def _on_step(self, rid: int, events: list[tuple[Any, ...]], obs: list[tuple[Any, ...]], stats: dict[str, int],
                 sent_at: float | None = None) -> None:
        """One engine step: hand out every row's event, wake each consumer once, replay the telemetry.
        ``sent_at``: the child's ``time.monotonic()`` at sending (CLOCK_MONOTONIC: one clock per host)."""
        received = time.monotonic()
        jobs = self._jobs
        flushes: dict[int, Callable[[], None]] = {}
        tokens = 0
        for t in events:
            jid, item = decode_event(t)
            job = jobs.get(jid)
            if job is None:
                continue
            if not isinstance(item, TokenEvent):
                del jobs[jid]
            else:
                tokens += 1
                if job.dead:
                    continue
            _hand(job, item, flushes)
        _wake(flushes)
        model = self._models.get(rid)
        if model is not None:
            model._observe(stats, tokens)
            observer = self._hooks[model._token].observer
            if observer is not None:
                for o in obs:
                    getattr(observer, o[0])(*o[1:])
                channel = getattr(observer, "step_channel", None)
                if channel is not None and sent_at is not None:
                    channel((received - sent_at) * 1e3)
        self._poll_cancels()

    def _poll_cancels(self) -> None:
        for jid, job in tuple(self._jobs.items()):
            if not job.cancel_sent and (job.dead or _is_set(job.cancel)):
                job.cancel_sent = True
                self.channel.note("cancel", jid)

    # --- the child's calls and notes -----------------------------------------------------------

    def _on_digest(self, token: int, digest: str) -> None:
        hook = self._hooks[token].on_digest
        assert hook is not None
        hook(digest)

    def _seal(self, token: int, jobs: int, beside_steps: bool, fingerprint: str) -> None:
        """The loop's seal check: the host's hook, fed the fingerprint the device just computed."""
        hooks = self._hooks[token]
        assert hooks.before_admit is not None and hooks.model is not None
        hooks.model._preset.value = fingerprint
        try:
            check = hooks.before_admit(jobs, beside_steps=beside_steps)
            if check is not None:
                check()
        finally:
            hooks.model._preset.value = None

    def _before_job(self, token: int) -> None:
        hook = self._hooks[token].before_job
        if hook is not None:
            hook()

    def _on_progress(self, token: int, done: int, total: int) -> None:
        hook = self._hooks.get(token)
        if hook is not None and hook.progress is not None:
            try:
                hook.progress(done, total)
            except Exception:  # noqa: BLE001 - as Engine.load: progress never fails a load
                pass

    def _on_fatal(self, token: int, err: Any) -> None:
        hook = self._hooks.get(token)
        if hook is not None and hook.on_fatal is not None:
            hook.on_fatal(decode_error(err))

    def _on_log(self, name: str, level: int, text: str) -> None:
        logging.getLogger(name).log(level, "%s", text)

    def _on_closed(self) -> None:
        """The process is gone: every job and every pending call fails; unasked, it is fatal."""
        err = WorkerError("the engine process exited", code=ErrorCode.INTERNAL)
        if not self._closing:
            time.sleep(0.05)  # its exit status, for the log
            log.error("engine process %d exited unexpectedly (status %s)", self._proc.pid, self._proc.poll())
        flushes: dict[int, Callable[[], None]] = {}
        for jid in list(self._jobs):
            job = self._jobs.pop(jid, None)
            if job is None:
                continue
            _hand(job, err, flushes)
        _wake(flushes)
        if not self._closing:
            for hooks in list(self._hooks.values()):
                if hooks.model is not None and hooks.on_fatal is not None:
                    try:
                        hooks.on_fatal(err)
                    except Exception:  # noqa: BLE001
                        log.exception("on_fatal failed")


def _hand(job: _Job, item: Any, flushes: dict[int, Callable[[], None]]) -> None:
    """Give ``item`` to the job's sink; its ``flush`` joins the step's wake-ups (once per object)."""
    try:
        job.sink(item)
    except Exception:  # noqa: BLE001 - a broken consumer must not stop the others
        log.exception("a job's event sink failed; the job is cancelled")
        job.dead = True
    if job.flush is not None:
        flushes[id(job.flush)] = job.flush


def _wake(flushes: dict[int, Callable[[], None]]) -> None:
    for flush in flushes.values():
        try:
            flush()
        except Exception:  # noqa: BLE001
            log.exception("a sink's flush failed")


class RemoteResident:
    """``ResidentModelLike`` of a model resident in the engine process."""

    def __init__(self, engine: ProcessEngine, rid: int, token: int, info: dict[str, Any]) -> None:
        self._engine = engine
        self._rid = rid
        self._token = token
        self._info = info
        self._stats: dict[str, int] = {**info["stats"]}
        self._tokens_out = 0
        self._t0 = time.monotonic()
        self._closed = False
        self._preset = threading.local()  # the seal check's fingerprint, on the thread that runs the check
        self.config = SimpleNamespace(vocab_size=int(info["vocab_size"]))

    @property
    def max_seq_len(self) -> int:
        return int(self._info["max_seq_len"])

    @property
    def max_batch(self) -> int:
        return int(self._info["max_batch"])

    @property
    def gpu_device(self) -> int:
        return int(self._info["gpu_device"])

    @property
    def seals_per_step(self) -> bool:
        return bool(self._info["seals_per_step"])

    def _observe(self, stats: dict[str, int], tokens: int) -> None:
        if stats:
            self._stats = stats
        self._tokens_out += tokens

    def stats(self) -> dict[str, int]:
        """As of the engine's last step note (one per step; the worker's gauges read it)."""
        return dict(self._stats)

    def tokens_per_second(self) -> float:
        dt = time.monotonic() - self._t0
        return self._tokens_out / dt if dt > 0 else 0.0

    def generate_into(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: Cancel, sink: Callable[[Any], None]
    ) -> None:
        """As ``ResidentModel.generate_into``; a job refused by the engine gets its error through ``sink``."""
        self._require_open()
        self._engine.submit(self._rid, prompt_ids, params, cancel, sink)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: Cancel = None
    ) -> Iterator[TokenEvent | GenerationEnd]:
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        abandoned = threading.Event()

        def stop() -> bool:
            return abandoned.is_set() or _is_set(cancel)

        self.generate_into(prompt_ids, params, stop, events.put)
        return read_events(events, abandoned)

    def fingerprint(self) -> str:
        self._require_open()
        return str(self._engine.channel.call("m_fingerprint", self._rid))

    def fingerprint_start(self, *, beside_steps: bool = False) -> _Ready | _Background:
        preset = getattr(self._preset, "value", None)
        if preset is not None:
            self._preset.value = None
            return _Ready(preset)
        return _Background(self.fingerprint)

    def attest(self) -> dict[str, Any]:
        self._require_open()
        return dict(self._engine.channel.call("m_attest", self._rid))

    def vram_bytes(self) -> int:
        return int(self._info["vram_bytes"])

    def follow(self, before_job: Callable[[], None] | None = None) -> str:
        self._engine._hooks[self._token].before_job = before_job
        return str(self._engine.channel.call("m_follow", self._rid, self._token))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine._models.pop(self._rid, None)
        if not self._engine.channel.closed:
            self._engine.channel.call("m_close", self._rid)

    def _require_open(self) -> None:
        if self._closed:
            raise WorkerError("the model was closed", code=ErrorCode.WORKER_NOT_READY)
