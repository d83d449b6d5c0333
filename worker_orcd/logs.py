"""Structured JSON logs: one object per line (SPEC 4800-4803, 4820-4822).

Redaction is structural: a record can only carry fields named in ``FIELDS``,
and none of them can hold prompt text, generated text, token ids or secrets.
A caller that passes anything else loses it (and the line says how many
fields were dropped), whatever the log level. Each event at a key point also
carries a ``human`` sentence for the operator reading the journal.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

LOGGER_NAME = "worker_orcd"
log = logging.getLogger(LOGGER_NAME)

# Every key a log line may carry. Nothing here may ever hold request/response text or a token.
FIELDS = frozenset(
    {
        "worker_id", "pool_id", "gpu_device", "device", "dev_mode", "model_ref", "digest", "shard_id",
        "correlation_id", "job_id", "fp6", "tokens_in", "tokens_out", "decode_time_ms", "ttft_ms",
        "prefill_ms", "stop_reason", "seal_verify_ms", "load_ms", "elapsed_ms", "duration_ms",
        "method", "path", "status", "state", "from_state", "code", "retriable", "error", "exc_type",
        "traceback", "uri", "callback_url", "attempt", "attempts", "delay_ms", "vram_bytes",
        "timeout_sec", "signal", "exit_code", "host", "port", "size_bytes", "reason", "version",
        "pid", "max_seq_len", "outcome",
    }
)
_RESERVED = frozenset({"ts", "level", "event", "human", "logger"})


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object; static context (worker, GPU, model) is added to every line."""

    def __init__(self, context: Mapping[str, Any]) -> None:
        super().__init__()
        self._context = context

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": event or "log",
            "human": getattr(record, "human", None) or record.getMessage(),
        }
        if event is None:
            out["logger"] = record.name
        out.update({k: v for k, v in self._context.items() if v is not None})
        fields: Mapping[str, Any] = getattr(record, "fields", {})
        dropped = 0
        for key, value in fields.items():
            if value is None:
                continue
            if key in FIELDS:
                out[key] = value
            elif key not in _RESERVED:
                dropped += 1
        if dropped:
            out["dropped_fields"] = dropped
        if record.exc_info and record.exc_info[1] is not None and "traceback" not in out:
            out["exc_type"] = type(record.exc_info[1]).__name__
            out["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"), default=str)


_context: dict[str, Any] = {}


def configure(level: str = "info", stream: TextIO | None = None, **context: Any) -> None:
    """Route this package's and uvicorn's loggers to one JSON handler on stderr."""
    _context.clear()
    set_context(**context)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(_context))
    for name in (LOGGER_NAME, "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # replaced by our own request line (fp6, correlation id)


def set_context(**context: Any) -> None:
    """Fields repeated on every later line (e.g. model_ref once a model is loaded)."""
    for key, value in context.items():
        if key not in FIELDS:
            raise ValueError(f"log context field {key!r} is not an allowed log field")
        _context[key] = value


def event(name: str, human: str, *, level: int = logging.INFO, exc: BaseException | None = None, **fields: Any) -> None:
    """Log one named event with its narration; fields outside ``FIELDS`` are dropped, never printed."""
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    log.log(level, human, extra={"event": name, "human": human, "fields": fields}, exc_info=exc_info)
