"""One running job: the engine's blocking generator on a thread, bridged to SSE frames.

The engine thread hands events to the stream's inbox on the event loop; the response
generator turns them into frames. The two ends have separate lives on
purpose: the client may go away (the job is cancelled and the thread stops
within one decode step), but the slot is released only when the thread has
really returned, so a new job can never overlap the old one on the device.

Ordering guarantees (SPEC 4252-4253): once a stop is requested (cancel,
disconnect, timeout, shutdown, fatal error) the stream checks the job's stop
code before every frame, so no token follows an acknowledged cancel; after
``end`` or ``error`` the generator returns and nothing else is sent.

The token fast path: while the response task waits on an empty inbox, the loop
callback that hands over engine steps renders each token and, at its end, writes
each stream's new frames to the connection in one write (``DirectBody``); anything
else, or a token while the inbox holds something or the socket pushes back, takes
the inbox, so frames leave in the engine's order either way.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import logs
from ..errors import ErrorCode, WorkerError
from ..engine.interface import ResidentModelLike
from ..lifecycle import FATAL_CODES, TokenizerLike, Worker
from ..metrics import SUCCESS
from ..scheduler import Job

_HANDOFFS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Handoff] = weakref.WeakKeyDictionary()


class _Handoff:
    """Events from engine threads to one event loop: one wake-up per burst, not per token.

    A step of 64 streams would otherwise cost 64 ``call_soon_threadsafe`` (a self-pipe write and
    a loop wake-up each) on the engine thread: the engine loop posts its tokens with
    ``wake=False`` and calls ``wake`` (the sink's ``flush``) once after the step. The flag is
    cleared before draining, so an item appended during or after a drain always has a drain
    scheduled after it (deque ops are atomic).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        self._written: list[JobStream] = []  # streams with direct frames rendered in the drain running now
        self._scheduled = False
        self._posted_at = 0.0  # when the drain now scheduled was asked for
        self.on_lag: Callable[[float], None] | None = None  # ms from asking for a drain to running it
        self.wake_cb = self.wake  # one object for every stream on this loop: the engine dedupes by it

    def post(self, deliver: Callable[[Any], None], item: Any, wake: bool = True) -> None:
        self._items.append((deliver, item))
        if wake:
            self.wake()

    def wake(self) -> None:
        if self._scheduled or not self._items:
            return
        self._scheduled = True
        self._posted_at = time.monotonic()
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed: the process is exiting
            self._scheduled = False

    def _drain(self) -> None:
        self._scheduled = False
        if self.on_lag is not None:
            self.on_lag((time.monotonic() - self._posted_at) * 1e3)
        items = self._items
        while items:
            deliver, item = items.popleft()
            deliver(item)
        if self._written:  # one socket write per stream per drain, however many steps it covers
            written, self._written = self._written, []
            for stream in written:
                stream._write_direct()

    def written(self, stream: JobStream) -> None:
        self._written.append(stream)


class _Inbox:
    """A stream's events, in order, for its response task.

    Not an ``asyncio.Queue``: under Python 3.11 ``wait_for(queue.get())`` runs the get in an inner
    task that takes the item off before the stream's task resumes, so "empty" could not tell the
    fast path that an event is still ahead of the next token. Here an item leaves only when the
    stream's task pops it."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def pop(self) -> Any:
        return self._items.popleft()

    async def wait(self, timeout: float) -> None:
        """Until an item is there; ``TimeoutError`` after ``timeout`` s."""
        if self._items:
            return
        w = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(w, timeout)
        finally:
            self._waiter = None


_HANDOFF_LOCK = threading.Lock()


def _handoff(loop: asyncio.AbstractEventLoop) -> _Handoff:
    h = _HANDOFFS.get(loop)
    if h is None:
        with _HANDOFF_LOCK:
            h = _HANDOFFS.setdefault(loop, _Handoff(loop))
    return h


class _EngineSink:
    """A stream's sink for the batching engine: tokens queue without a wake-up; ``flush`` (called
    by the engine loop after each step, once per event loop) wakes the event loop once."""

    def __init__(self, stream: Any, handoff: _Handoff) -> None:
        self._stream = stream
        self.flush = handoff.wake_cb

    def __call__(self, event: Any) -> None:
        self._stream._on_engine_event(event, wake=False)
from .protocol import DIRECT_BODY, DirectBody
from .sse import HEADERS, KEEPALIVE, MEDIA_TYPE, frame

_DONE = object()  # the engine thread returned
_WAKE = object()  # a stop was requested; re-check the job


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _as_worker_error(exc: BaseException, job_id: str) -> WorkerError:
    """Engine failures keep their code; anything untyped becomes INTERNAL without its internals."""
    if isinstance(exc, WorkerError):
        return exc
    if isinstance(exc, MemoryError):
        return WorkerError("host memory exhausted during inference", code=ErrorCode.HOST_OOM)
    return WorkerError(f"internal error during inference (job {job_id}); details are in the worker log", code=ErrorCode.INTERNAL)


class JobStream:
    def __init__(
        self,
        worker: Worker,
        job: Job,
        model: ResidentModelLike,
        tokenizer: TokenizerLike,
        prompt_ids: Sequence[int],
        params: Any,
        seal_ms: float,
        fp6: str,
    ) -> None:
        self.worker, self.job, self.model = worker, job, model
        handle = worker.handle  # present while a job is admitted; the engine's model knows no handle
        self.model_ref = handle.model_ref if handle is not None else ""
        self.prompt_ids, self.params = list(prompt_ids), params
        self.detok = tokenizer.stream(skip_special=True)  # an EOS token ends the stream, it is not text
        self.seal_ms, self.fp6 = seal_ms, fp6
        self.inbox = _Inbox()
        self.outcome: str | None = None  # "end" | error code | "disconnected"
        self._loop = asyncio.get_running_loop()
        self._handoff = _handoff(self._loop)  # looked up once, not per token on the engine thread
        if self._handoff.on_lag is None:
            self._handoff.on_lag = worker.metrics.loop_lag_ms.observe
        self._timer: asyncio.TimerHandle | None = None
        self._t0 = time.monotonic()
        self._last_token: float | None = None
        self._engine_ok = False  # the engine reached a normal end (eos / max_tokens)
        self._released = False
        self.direct: DirectBody | None = None  # the connection, once the response has started (EventStreamResponse)
        self._waiting = False  # frames() waits on an empty inbox: a token may go straight to the socket
        self._last_keepalive = 0.0
        self._direct_frames: list[bytes] = []  # rendered by the drain running now, written at its end

    # --- engine side ---------------------------------------------------------------------

    def start(self) -> None:
        w, job = self.worker, self.job
        w.begin_job()
        w.metrics.jobs_started.inc()
        w.metrics.tokens_in.inc(len(self.prompt_ids))
        job.on_stop = lambda: self.inbox.put(_WAKE)
        timeout = w.config.inference_timeout_sec
        self._timer = self._loop.call_later(
            timeout, job.request_stop, ErrorCode.INFERENCE_TIMEOUT, f"job exceeded the inference timeout of {timeout:g} s"
        )
        p = self.params
        logs.event(
            "execute_start",
            "Job {job_id} started for caller {fp6}: {tokens_in} prompt tokens in, at most {max_tokens} tokens out "
            "(temperature {temperature}, seed {seed}); the seal verified in {seal_verify_ms:.2f} ms.",
            job_id=job.job_id, tokens_in=len(self.prompt_ids), fp6=self.fp6, max_tokens=getattr(p, "max_tokens", None),
            temperature=getattr(p, "temperature", None), seed=getattr(p, "seed", None),
            seal_verify_ms=round(self.seal_ms, 3),
        )
        into = getattr(self.model, "generate_into", None)
        if callable(into):  # the batching engine hands events over on its own thread: no thread per job
            try:
                into(self.prompt_ids, self.params, self.job.cancel, _EngineSink(self, self._handoff))
            except BaseException as e:  # noqa: BLE001 - refused at submission: the same path as an engine error
                self._on_engine_event(e)
            return
        # The thread runs in a copy of the request's log context: its lines keep the correlation id.
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._produce,), name=f"job-{job.job_id[:16]}", daemon=True).start()

    def _post(self, item: Any, wake: bool = True) -> None:
        self._handoff.post(self._deliver, item, wake)

    def _deliver(self, item: Any) -> None:
        """On the loop: a token straight to the socket when nothing is ahead of it, else the inbox."""
        d = self.direct
        if (d is not None and self._waiting and self.inbox.empty() and self.outcome is None
                and self.job.stop_code is None and hasattr(item, "token_id") and d.ready()):
            chunk = self._token(item)
            if not self._direct_frames:
                self._handoff.written(self)
            self._direct_frames.append(chunk)
            if self.outcome is not None:  # the rendering ended the stream (a stop string): frames() returns
                self.inbox.put(_WAKE)
            return
        self.inbox.put(item)

    def _produce(self) -> None:
        try:
            for event in self.model.generate(self.prompt_ids, self.params, self.job.cancel):
                self._post(event)
                if getattr(event, "stop_reason", "cancelled") != "cancelled":
                    self._engine_ok = True
        except BaseException as e:  # noqa: BLE001 - everything crosses to the loop as a typed error
            self._engine_ok = False
            self._post(_Failed(e))
        finally:
            self._engine_done()

    def _on_engine_event(self, event: Any, wake: bool = True) -> None:
        """The engine's sink (its thread, or the loop's at submission): what _produce would post.
        ``wake=False``: a token from the engine loop, which wakes the event loop once per step."""
        if isinstance(event, BaseException):
            self._engine_ok = False
            self._post(_Failed(event))
            self._engine_done()
            return
        self._post(event, wake or hasattr(event, "stop_reason"))
        if hasattr(event, "stop_reason"):
            if event.stop_reason != "cancelled":
                self._engine_ok = True
            self._engine_done()

    def _write_direct(self) -> None:
        """At the end of the drain that rendered them (nothing ran in between: ``ready`` still holds)."""
        frames, self._direct_frames = self._direct_frames, []
        self.worker.metrics.tokens_generated.inc(len(frames))  # once per write, as frames() counts
        body = b"".join(frames)
        if body and self.direct is not None:
            self.direct.write(body)

    def _engine_done(self) -> None:
        self._post(_DONE)
        try:
            self._loop.call_soon_threadsafe(self._thread_exited)
        except RuntimeError:
            pass

    def _thread_exited(self) -> None:
        """On the loop, once the engine really stopped: free the slot (however the job ended)."""
        # A façade may end the stream itself (an OpenAI stop string) and stop the engine early: still a success.
        self._release(ok=(self._engine_ok or self.outcome == "end") and self.job.stop_code is None)

    def _release(self, ok: bool) -> None:
        """Give the job's place back (idempotent). Called before ``end`` is sent: the engine has already
        let go of the job when it emits its end, so a caller who sends the next request on ``end`` is
        never refused as busy (issue 10, defect 4)."""
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
        w = self.worker
        w.scheduler.finish(self.job, ok=ok)
        w.end_job()
        w.metrics.inference_ms.observe((time.monotonic() - self._t0) * 1000)

    # --- client side ---------------------------------------------------------------------

    async def frames(self) -> AsyncGenerator[bytes, None]:
        job = self.job
        keepalive = self.worker.config.sse_keepalive_sec
        try:
            started = self.render_started()
            if started:
                yield started
            held: Any = None  # an event read while joining tokens, handled next
            while True:
                if self.outcome is not None:  # a directly written token ended the stream (a stop string)
                    return
                try:
                    # a burst handed over at once is read without a timer per token
                    if held is not None:
                        item, held = held, None
                    elif not self.inbox.empty():
                        item = self.inbox.pop()
                    else:
                        self._waiting = True
                        try:
                            await self.inbox.wait(self._quiet_for(keepalive))
                        finally:
                            self._waiting = False
                        item = self.inbox.pop()
                except TimeoutError:
                    if job.stop_code is None:
                        if self._quiet_for(keepalive) <= 0.0:  # no frame (direct tokens count) for keepalive s
                            self._last_keepalive = time.monotonic()
                            yield KEEPALIVE
                        continue
                    item = _WAKE
                if job.stop_code is not None:  # checked before EVERY frame: nothing after a stop (4252)
                    yield self._error(WorkerError(job.stop_message, code=job.stop_code))
                    return
                if item is _WAKE:
                    continue
                if isinstance(item, _Failed):
                    yield self._error(self._engine_failure(item.exc))
                    return
                if item is _DONE:
                    yield self._error(WorkerError("the engine stopped without ending the stream", code=ErrorCode.INTERNAL))
                    return
                if hasattr(item, "token_id"):
                    chunk = self._token(item) or b""
                    n = 1
                    # tokens already queued (a stream that fell behind) go out in one write, each
                    # rendered only while no stop is set, as if yielded one by one
                    while self.outcome is None and job.stop_code is None and not self.inbox.empty():
                        nxt = self.inbox.pop()
                        if not hasattr(nxt, "token_id"):
                            held = nxt
                            break
                        chunk += self._token(nxt) or b""
                        n += 1
                    self.worker.metrics.tokens_generated.inc(n)  # once per write, not per token
                    if chunk:
                        yield chunk
                    if self.outcome is not None:  # the rendering ended the stream (e.g. a stop string)
                        return
                elif hasattr(item, "stop_reason"):
                    if item.stop_reason == "cancelled":  # engine saw the cancel flag first
                        code = job.stop_code or ErrorCode.CANCELLED
                        yield self._error(WorkerError(job.stop_message or "job cancelled", code=code))
                        return
                    self._release(ok=True)
                    for chunk in self._end(item):
                        if chunk:
                            yield chunk
                    return
        finally:
            self.abandon()

    def _quiet_for(self, keepalive: float) -> float:
        """Seconds until a keep-alive is due: ``keepalive`` after the last token or keep-alive (or from now)."""
        last = max(self._last_keepalive, self._last_token or 0.0)
        if last == 0.0:
            self._last_keepalive = last = time.monotonic()
        return keepalive - (time.monotonic() - last)

    def abandon(self) -> None:
        """The client left before a final event (or the stream never ran): cancel the same way (SPEC)."""
        if self.outcome is not None:
            return
        job = self.job
        self.outcome = "disconnected"
        job.request_stop(ErrorCode.CANCELLED, "client disconnected")
        self.worker.metrics.jobs_failed.labels(code=ErrorCode.CANCELLED.value).inc()
        logs.event(
            "client_disconnect",
            "The client of job {job_id} went away after {tokens_sent} tokens; the job is cancelled.",
            level=logging.WARNING, job_id=job.job_id, tokens_sent=job.tokens_sent,
        )

    def _engine_failure(self, exc: BaseException) -> WorkerError:
        err = _as_worker_error(exc, self.job.job_id)
        if err.code == ErrorCode.INTERNAL:
            logs.event(
                "internal_error", "Unexpected {exc_type} in the engine while running job {job_id}.",
                level=logging.ERROR, exc=exc, job_id=self.job.job_id,
            )
        if err.code in FATAL_CODES:
            self.worker.fail(err)
        return err

    def _token(self, event: Any) -> bytes:
        if self.job.state == "pending":  # the engine scheduled it: queued -> executing
            self.worker.scheduler.start(self.job)
        now = time.monotonic()
        if self._last_token is None:
            self.worker.metrics.ttft_ms.observe((now - self._t0) * 1000)
        else:
            self.worker.metrics.inter_token_ms.observe((now - self._last_token) * 1000)
        self._last_token = now
        self.job.tokens_sent += 1
        return self.render_token(event, self.detok.push(event.token_id))

    def _end(self, end: Any) -> list[bytes]:
        m, job = self.worker.metrics, self.job
        self.outcome = "end"
        m.jobs_completed.inc()
        decode_s = end.decode_time_ms / 1000
        rate = (end.tokens_out - 1) / decode_s if decode_s > 0 and end.tokens_out > 1 else None
        data = {
            "tokens_in": end.tokens_in,
            "tokens_out": end.tokens_out,
            "decode_time_ms": round(end.decode_time_ms, 3),
            "ttft_ms": round(end.ttft_ms, 3),
            "prefill_ms": round(end.prefill_ms, 3),
            "stop_reason": end.stop_reason,
        }
        tail = self.detok.flush()
        if tail:  # bytes of an unfinished character at a max_tokens stop: never dropped silently
            data["tail"] = tail
        logs.event(
            "execute_end",
            "Job {job_id} finished ({stop_reason}): {tokens_in} tokens in, {tokens_out} out; first token after "
            "{ttft_ms:.0f} ms, then {decode_time_ms:.0f} ms of decoding ({tokens_per_s:.1f} tokens/s)."
            if rate is not None else
            "Job {job_id} finished ({stop_reason}): {tokens_in} tokens in, {tokens_out} out; first token after "
            "{ttft_ms:.0f} ms.",
            job_id=job.job_id, tokens_in=end.tokens_in, tokens_out=end.tokens_out,
            decode_time_ms=round(end.decode_time_ms, 3), ttft_ms=round(end.ttft_ms, 3),
            prefill_ms=round(end.prefill_ms, 3), stop_reason=end.stop_reason,
            tokens_per_s=round(rate, 3) if rate is not None else None,
        )
        metrics = {
            "prefill_ms": round(end.prefill_ms, 3),
            "ttft_ms": round(end.ttft_ms, 3),
            "decode_tokens_per_s": round(rate, 3) if rate is not None else None,
            "seal_verify_ms": round(self.seal_ms, 3),
            "total_ms": round((time.monotonic() - self._t0) * 1000, 3),
        }
        return self.render_end(end, data, metrics)

    def _error(self, err: WorkerError) -> bytes:
        self.outcome = err.code.value
        self.worker.metrics.jobs_failed.labels(code=err.code.value).inc()
        logs.event(
            "execute_error", "Job {job_id} ended with {code} after {tokens_sent} tokens: {error}.",
            level=logging.WARNING if err.code in (ErrorCode.CANCELLED, ErrorCode.INFERENCE_TIMEOUT) else logging.ERROR,
            job_id=self.job.job_id, code=err.code.value, error=err.message, tokens_sent=self.job.tokens_sent,
            retriable=err.retriable,
        )
        return self.render_error(err)

    # --- the wire format: /worker/execute's events; another façade (OpenAI) overrides these ---

    def render_started(self) -> bytes:
        return frame(
            "started",
            {
                "job_id": self.job.job_id,
                "model": self.model_ref,
                "started_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "correlation_id": self.job.correlation_id,
            },
        )

    def render_token(self, event: Any, text: str) -> bytes:
        return frame("token", {"t": text, "i": event.index})

    def render_end(self, end: Any, data: dict[str, Any], metrics: dict[str, Any]) -> list[bytes]:
        return [frame("metrics", metrics), frame("end", data)]

    def render_error(self, err: WorkerError) -> bytes:
        return frame("error", err.to_dict())


class EventStreamResponse(Response):
    """Streams frames and cancels them the moment the client disconnects (not at the next write)."""

    media_type = MEDIA_TYPE

    def __init__(self, job: JobStream, headers: dict[str, str]) -> None:
        self.job = job
        self.status_code = 200
        self.background = None
        self.init_headers({**HEADERS, **headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                        direct = scope.get("extensions", {}).get(DIRECT_BODY)
                        if isinstance(direct, DirectBody):
                            self.job.direct = direct
                        async with aclosing(self.job.frames()) as frames:  # finalised now, not at GC time
                            async for chunk in frames:
                                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:
                        pass  # the client is gone; abandon() below cancels the job
                    finally:
                        tg.cancel_scope.cancel()

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            self.job.abandon()
            record_outcome(scope, self.job)


def record_outcome(scope: Scope, job: JobStream) -> None:
    """The request metric counts a job's response by how the job ended, not by its status (middleware.py)."""
    ended = job.outcome
    scope.setdefault("state", {})["outcome"] = (
        SUCCESS if ended == "end" else ErrorCode.CANCELLED.value if ended in (None, "disconnected") else ended
    )
