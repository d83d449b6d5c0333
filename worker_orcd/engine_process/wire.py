"""What crosses the process boundary, in plain tuples: errors keep their code, events stay small.

A token is a 5-tuple (job, index, id, logprob, top_logprobs): one step of 64 streams is one
message of 64 tuples (pickling a dataclass costs several times a tuple). Errors travel as their
fields, not as pickled exceptions: a WorkerError subclass rebuilt on the other side keeps its code,
message, retry hint and log-only detail; anything else becomes INTERNAL (HOST_OOM for a
MemoryError), as the HTTP layer would render it anyway.
"""

from __future__ import annotations

from typing import Any

from ..engine.events import GenerationEnd, TokenEvent
from ..errors import (
    CapabilityError, ErrorCode, InvalidParams, ModelLoadError, SealVerificationError, WorkerError,
)

_CLASSES: dict[str, type[WorkerError]] = {
    c.__name__: c for c in (WorkerError, ModelLoadError, CapabilityError, InvalidParams, SealVerificationError)
}

EncodedError = tuple[str, str, str, bool, "int | None", "str | None"]


def encode_error(e: BaseException) -> EncodedError:
    if isinstance(e, WorkerError):
        name = type(e).__name__ if type(e).__name__ in _CLASSES else "WorkerError"
        return (name, e.message, e.code.value, e.retriable, e.retry_after_ms, e.detail)
    if isinstance(e, MemoryError):
        return ("WorkerError", "host memory exhausted in the engine process", ErrorCode.HOST_OOM.value, True, 1000, None)
    return ("WorkerError", f"internal error in the engine process ({type(e).__name__}); details are in the worker log",
            ErrorCode.INTERNAL.value, False, None, f"{type(e).__name__}: {e}")


def decode_error(t: EncodedError) -> WorkerError:
    name, message, code, retriable, retry_after_ms, detail = t
    cls = _CLASSES.get(name, WorkerError)
    return cls(message, code=ErrorCode(code), retriable=retriable, retry_after_ms=retry_after_ms, detail=detail)


def encode_event(job: int, item: Any) -> tuple[Any, ...]:
    """A token as a 5-tuple; an end or an error as (job, "end"|"err", fields)."""
    if isinstance(item, TokenEvent):
        return (job, item.index, item.token_id, item.logprob, item.top_logprobs)
    if isinstance(item, GenerationEnd):
        return (job, "end", (item.tokens_in, item.tokens_out, item.stop_reason, item.prefill_ms, item.ttft_ms,
                             item.decode_time_ms, item.queue_ms, item.preemptions))
    return (job, "err", encode_error(item))


def decode_event(t: tuple[Any, ...]) -> tuple[int, Any]:
    if len(t) == 5:
        return t[0], TokenEvent(t[1], t[2], t[3], t[4])
    if t[1] == "end":
        return t[0], GenerationEnd(*t[2])
    return t[0], decode_error(t[2])
