"""A job's stream in OpenAI's format: ``data: {chunk}`` lines and ``data: [DONE]``, or one JSON body.

It is JobStream (stream.py) with other renderings, so the engine thread, the
slot, the timeout, the cancel on disconnect, the metrics and the log lines are
the ones /worker/execute has. Stop strings are matched here, on text: when one
completes, the answer ends with ``finish_reason: stop`` and the engine is told
to stop (as for a cancel, but the job counts as completed).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..engine.events import GenerationEnd
from ..errors import ErrorCode, WorkerError
from ..stop_strings import StopMatcher
from . import openai_errors
from .stream import JobStream, record_outcome

DONE = b"data: [DONE]\n\n"
ENGINE_EXIT_WAIT_S = 5.0  # [DONE] waits (at most this) for the engine to give the slot back
FINISH = {"eos": "stop", "max_tokens": "length", "stop": "stop"}


@dataclass
class OpenAIOptions:
    kind: str  # "chat" | "text"
    stream: bool
    include_usage: bool
    stops: list[str]
    logprobs: bool
    top_logprobs: int
    model_id: str
    fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n\n"


_PLAIN = re.compile(r'[^"\\\x00-\x1f]*\Z')  # nothing json.dumps(ensure_ascii=False) would escape


def _sse_text(text: str) -> bytes:
    """A string as ``_sse`` encodes it inside a chunk (most tokens' text needs no escape: no json.dumps)."""
    if _PLAIN.match(text):
        return b'"' + text.encode() + b'"'
    return json.dumps(text, ensure_ascii=False).encode()


class OpenAIStream(JobStream):
    def __init__(self, *args: Any, opts: OpenAIOptions) -> None:
        super().__init__(*args)
        self.opts = opts
        self._tokenizer = args[3]
        self.stop = StopMatcher(opts.stops)
        self.text: list[str] = []
        self.lp_tokens: list[dict[str, Any]] = []  # one entry per generated token with logprobs
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.failure: WorkerError | None = None
        self._first_at: float | None = None
        self._engine_exited = asyncio.Event()
        self.id = ("chatcmpl-" if opts.kind == "chat" else "cmpl-") + self.job.job_id
        self._chunk_frame: tuple[bytes, bytes] | None = None  # _text_chunk's prefix and suffix

    # --- lifecycle hooks --------------------------------------------------------------------

    def _thread_exited(self) -> None:
        super()._thread_exited()
        self._engine_exited.set()

    async def frames(self) -> AsyncGenerator[bytes, None]:
        async for chunk in super().frames():
            yield chunk
        if self.opts.stream and self.outcome == "end":
            # The slot is free before the client hears [DONE]: its next request is never refused as busy.
            try:
                await asyncio.wait_for(self._engine_exited.wait(), ENGINE_EXIT_WAIT_S)
            except TimeoutError:
                pass
            yield DONE

    async def run_to_end(self) -> None:
        """Non-streaming: drive the stream to its end (results land on self)."""
        async for _ in self.frames():
            pass
        if self.outcome == "end":
            try:
                await asyncio.wait_for(self._engine_exited.wait(), ENGINE_EXIT_WAIT_S)
            except TimeoutError:
                pass

    # --- rendering --------------------------------------------------------------------------

    def _text_chunk(self, text: str) -> bytes:
        """``_chunk(text)`` from a prefix and suffix rendered once per stream: the per-token case
        (no logprobs, no finish reason) is then one string encode, not a dict's."""
        if self._chunk_frame is None:
            mark = "\x00mark\x00"
            head, tail = self._chunk(mark).split(_sse_text(mark))
            self._chunk_frame = (head, tail)
        head, tail = self._chunk_frame
        return head + _sse_text(text) + tail

    def _chunk(self, text: str | None, *, finish: str | None = None, logprobs: list[dict[str, Any]] | None = None,
               role: bool = False) -> bytes:
        o = self.opts
        choice: dict[str, Any] = {"index": 0}
        if o.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
            choice["logprobs"] = {"content": logprobs} if logprobs else None
        else:
            choice["text"] = text or ""
            choice["logprobs"] = self._text_logprobs(logprobs) if logprobs else None
        choice["finish_reason"] = finish
        return _sse({
            "id": self.id, "object": "chat.completion.chunk" if o.kind == "chat" else "text_completion",
            "created": o.created, "model": o.model_id, "system_fingerprint": o.fingerprint, "choices": [choice],
        })

    def render_started(self) -> bytes:
        if self.opts.stream and self.opts.kind == "chat":
            return self._chunk("", role=True)
        return b""

    def _token_logprobs(self, event: Any) -> dict[str, Any] | None:
        if not self.opts.logprobs or event.logprob is None:
            return None

        def entry(token_id: int, lp: float) -> dict[str, Any]:
            raw = bytes(self._tokenizer.token_bytes(token_id))
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

        out = entry(event.token_id, event.logprob)
        out["top_logprobs"] = [entry(t, lp) for t, lp in event.top_logprobs[: self.opts.top_logprobs]]
        return out

    def _text_logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """The legacy completions shape: parallel lists."""
        offset = sum(len(t) for t in self.text)
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }

    def render_token(self, event: Any, text: str) -> bytes:
        if self._first_at is None:
            self._first_at = time.monotonic()
        lp = self._token_logprobs(event)
        if lp is not None:
            self.lp_tokens.append(lp)
        out = self.stop.push(text)
        chunk = b""
        if self.opts.stream and lp is None and out:
            chunk = self._text_chunk(out)
        elif self.opts.stream and (out or lp is not None):
            chunk = self._chunk(out, logprobs=[lp] if lp is not None else None)
        if out:
            self.text.append(out)
        if self.stop.stopped is not None:
            chunk += b"".join(self._end_by_stop_string())
        return chunk

    def _end_by_stop_string(self) -> list[bytes]:
        """A stop string completed: end the answer now and let the engine stop within one step."""
        self.job.cancel.set()  # no stop code: not a cancel, the job completes
        now = time.monotonic()
        first = self._first_at or now
        end = GenerationEnd(
            tokens_in=len(self.prompt_ids), tokens_out=self.job.tokens_sent, stop_reason="stop",  # type: ignore[arg-type]
            prefill_ms=(first - self._t0) * 1e3, ttft_ms=(first - self._t0) * 1e3, decode_time_ms=(now - first) * 1e3,
        )
        return self._end(end)

    def render_end(self, end: Any, data: dict[str, Any], metrics: dict[str, Any]) -> list[bytes]:
        tail = self.stop.flush() + (data.get("tail", "") if self.stop.stopped is None else "")
        if tail:
            self.text.append(tail)
        self.finish_reason = FINISH.get(end.stop_reason, "stop")
        self.usage = {"prompt_tokens": end.tokens_in, "completion_tokens": end.tokens_out,
                      "total_tokens": end.tokens_in + end.tokens_out}
        if not self.opts.stream:
            return []
        out = [self._chunk(tail)] if tail else []
        out.append(self._chunk(None if self.opts.kind == "chat" else "", finish=self.finish_reason))
        if self.opts.include_usage:
            o = self.opts
            out.append(_sse({
                "id": self.id, "object": "chat.completion.chunk" if o.kind == "chat" else "text_completion",
                "created": o.created, "model": o.model_id, "system_fingerprint": o.fingerprint, "choices": [],
                "usage": self.usage,
            }))
        return out

    def render_error(self, err: WorkerError) -> bytes:
        self.failure = err
        return _sse(openai_errors.body(err)) if self.opts.stream else b""

    # --- the non-streaming body -------------------------------------------------------------

    def completion(self) -> dict[str, Any]:
        o, text = self.opts, "".join(self.text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if o.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            choice["logprobs"] = {"content": self.lp_tokens, "refusal": None} if o.logprobs else None
        else:
            choice["text"] = text
            self.text = []  # offsets count from the start of the answer
            choice["logprobs"] = self._text_logprobs(self.lp_tokens) if o.logprobs else None
        return {
            "id": self.id, "object": "chat.completion" if o.kind == "chat" else "text_completion",
            "created": o.created, "model": o.model_id, "system_fingerprint": o.fingerprint,
            "choices": [choice], "usage": self.usage,
        }


class CompletionResponse(Response):
    """Non-streaming: runs the job to its end, cancelling it if the client disconnects first; then one
    JSON body (200, or the error's status in OpenAI's shape)."""

    media_type = "application/json"

    def __init__(self, job: OpenAIStream, headers: dict[str, str]) -> None:
        self.job = job
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = False
        try:
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    await self.job.run_to_end()
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    nonlocal gone
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    gone = True
                    tg.cancel_scope.cancel()

                tg.start_soon(run)
                tg.start_soon(watch)
        finally:
            self.job.abandon()
            record_outcome(scope, self.job)
        if gone:
            return
        err = self.job.failure
        if self.job.outcome == "end":
            status, content = 200, self.job.completion()
        else:
            err = err or WorkerError("the job ended without an answer", code=ErrorCode.INTERNAL)
            status, content = err.http_status, openai_errors.body(err)
        payload = json.dumps(content, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        headers = [*self.raw_headers, (b"content-type", b"application/json"),
                   (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})
