"""Structured JSON logs: one object per line (SPEC 4800-4803, 4820-4822).

Redaction is structural, not a filter applied afterwards:

* ``event()`` is the only way request-handling code logs. A record carries
  only fields named in ``FIELDS``, each with a declared scalar kind (id,
  text, int, number, bool, URL, traceback); anything else - an unknown name,
  a list, a dict, bytes, an object - is dropped before formatting, whatever
  the level, and the line says how many fields were dropped. No field can
  hold a prompt, generated text, token ids or a credential.
* The ``human`` narration is a *template* over those same fields
  (``"Loaded {model_ref} ({size_mb:.0f} MB) ..."``), rendered here from the
  validated values; call sites pass literals, never pre-formatted text
  (tests/test_logs.py checks every call site).
* Exceptions are logged as their type and stack frames; the message is kept
  only for ``WorkerError`` (written to be shown to clients). An untyped
  exception's text may quote its input, so it is never printed.
* Lines from other loggers keep their text only for trusted sources (this
  package, uvicorn's server log, Python warnings); any other library's
  warning is reduced to its logger name and level. uvicorn's access log,
  which would print query strings, is disabled (``http_request`` replaces it).

Context comes in two layers: per process (worker id, GPU, model, set once)
and per request (correlation id, job id, caller fp6) in a ``ContextVar``, so
every line logged while serving a request carries its correlation id, also
from threads started with the request's context.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import sys
import traceback
from collections.abc import Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from enum import Enum
from types import MappingProxyType, TracebackType
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

from .errors import WorkerError

LOGGER_NAME = "worker_orcd"
log = logging.getLogger(LOGGER_NAME)

Kind = Literal["id", "text", "int", "num", "bool", "url", "trace"]
MAX_LEN: Mapping[str, int] = MappingProxyType({"id": 200, "text": 1000, "url": 500, "trace": 16_000})
MAX_HUMAN = 1000

# Every key a log line may carry, with the kind of value it accepts. Nothing here may ever hold
# request or response text, token ids or a secret; adding a field is a reviewed code change.
FIELDS: Mapping[str, Kind] = MappingProxyType(
    {
        # who / where
        "worker_id": "id", "pool_id": "id", "gpu_device": "int", "device": "id", "dev_mode": "bool",
        "version": "id", "pid": "int", "host": "id", "port": "int", "uri": "url", "callback_url": "url", "callback": "id",
        "user": "id", "group": "id", "uid": "int", "gid": "int", "callers": "int", "file": "text",
        # model
        "model_ref": "id", "model_id": "id", "architecture": "id", "digest": "id", "signature": "id",
        "shard_id": "id", "tp_rank": "int", "tp_degree": "int", "tp_group_id": "id", "size_bytes": "int", "size_mb": "num", "vram_bytes": "int", "max_seq_len": "int",
        "load_ms": "num", "load_s": "num", "seal_verify_ms": "num",
        # request / job
        "correlation_id": "id", "job_id": "id", "fp6": "id", "method": "id", "path": "id", "status": "int",
        "outcome": "id", "duration_ms": "num", "elapsed_ms": "num", "tokens_in": "int", "tokens_out": "int",
        "tokens_sent": "int", "max_tokens": "int", "temperature": "num", "seed": "int", "stop_reason": "id",
        "decode_time_ms": "num", "ttft_ms": "num", "prefill_ms": "num", "tokens_per_s": "num",
        # lifecycle / errors
        "state": "id", "from_state": "id", "code": "id", "retriable": "bool", "error": "text",
        "exc_type": "id", "traceback": "trace", "reason": "text", "signal": "id", "exit_code": "int",
        "timeout_sec": "num", "connections": "int", "max_connections": "int", "attempt": "int", "attempts": "int", "delay_ms": "num",
    }
)
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Loggers whose free text is written by code we trust not to quote request data.
TRUSTED_LOGGERS = ("worker_orcd", "uvicorn", "py.warnings")
_FORMATTER = string.Formatter()


def clean(key: str, value: Any) -> Any:
    """The value as it may be logged under ``key``, or None when the field or value is not allowed."""
    kind = FIELDS.get(key)
    if kind is None or value is None:
        return None
    if isinstance(value, Enum):
        value = value.value
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "num":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return value
    if not isinstance(value, str):
        return None
    if kind == "url":
        value = _redact_url(value)
    limit = MAX_LEN[kind]
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _redact_url(url: str) -> str:
    """scheme://host:port/path only: user-info, query and fragment may carry credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(unparseable URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else "(relative URL)"


def render(template: str, values: Mapping[str, Any]) -> str:
    """Fill ``{field}`` / ``{field:spec}`` from validated values; a missing value reads '?'.

    A template that names anything other than an allowed field (attribute access,
    indexing, a stray brace in pre-formatted text) is kept verbatim, never evaluated.
    """
    try:
        chunks = list(_FORMATTER.parse(template))
    except ValueError:
        return template[:MAX_HUMAN]
    if any(name is not None and name not in FIELDS for _, name, _, _ in chunks):
        return template[:MAX_HUMAN]
    out: list[str] = []
    for literal, name, spec, _ in chunks:
        out.append(literal)
        if name is None:
            continue
        value = values.get(name)
        if value is None:
            out.append("?")
            continue
        try:
            out.append(format(value, spec or ""))
        except (ValueError, TypeError):
            out.append(str(value))
    text = "".join(out)
    return text if len(text) <= MAX_HUMAN else text[: MAX_HUMAN - 1] + "…"


def describe_exception(exc: BaseException) -> dict[str, str]:
    """Type and stack frames; the message only for WorkerError (client-safe by construction)."""
    lines: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if lines:
            lines.append("caused by:")
        lines.append(type(current).__qualname__)
        lines.extend(
            f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in traceback.extract_tb(current.__traceback__)
        )
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    out = {"exc_type": type(exc).__qualname__, "traceback": "\n".join(lines)}
    if isinstance(exc, WorkerError):
        out["error"] = exc.message
        out["code"] = exc.code.value
    return out


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object: process context, request context, then the event's fields."""

    def __init__(self, context: Mapping[str, Any] | None = None) -> None:
        """``context``: fixed fields for this formatter; by default the live process context."""
        super().__init__()
        self._context = context

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": event or "log",
        }
        values: dict[str, Any] = {}
        for layer in (_process if self._context is None else self._context, _request.get()):
            values.update((k, v) for k, v in layer.items() if v is not None)
        dropped = 0
        for key, raw in getattr(record, "fields", {}).items():
            value = clean(key, raw)
            if value is not None:
                values[key] = value
            elif raw is not None:
                dropped += 1
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            for key, value in describe_exception(exc).items():
                cleaned = clean(key, value)
                if key not in values and cleaned is not None:
                    values[key] = cleaned
        if event is not None:
            out["human"] = render(getattr(record, "template", ""), values)
        else:
            out["logger"] = record.name
            out["human"] = _foreign_text(record)
        out.update(values)
        if dropped:
            out["dropped_fields"] = dropped
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _foreign_text(record: logging.LogRecord) -> str:
    if not record.name.startswith(TRUSTED_LOGGERS):
        return f"({record.levelname.lower()} from {record.name}; text withheld: not an allow-listed logger)"
    try:
        text = record.getMessage()
    except (TypeError, ValueError):
        text = str(record.msg)
    return text if len(text) <= MAX_HUMAN else text[: MAX_HUMAN - 1] + "…"


# Replaced, never mutated: a line formatted on another thread sees the old or the new mapping whole.
_process: Mapping[str, Any] = MappingProxyType({})
_request: ContextVar[Mapping[str, Any]] = ContextVar("worker_orcd_log_request", default=MappingProxyType({}))


def configure(level: str = "info", stream: TextIO | None = None, **context: Any) -> None:
    """Route this package's, uvicorn's and (at warning) every other logger to one JSON handler.

    Other libraries reach it through ``logging.lastResort`` (used only while the root logger
    has no handler of its own), so an embedding application's logging stays untouched.
    """
    global _process
    _process = MappingProxyType(_checked(context))
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in (LOGGER_NAME, "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False
    access = logging.getLogger("uvicorn.access")  # would print request lines with their query strings
    access.handlers[:] = []
    access.propagate = False
    access.disabled = True
    fallback = logging.StreamHandler(stream or sys.stderr)
    fallback.setFormatter(JsonFormatter())
    fallback.setLevel(logging.WARNING)
    logging.lastResort = fallback
    logging.captureWarnings(True)


def flush() -> None:
    """Before a forced exit: nothing already logged may be lost."""
    for handler in (*log.handlers, logging.lastResort):
        if handler is not None:
            handler.flush()


def _checked(fields: Mapping[str, Any]) -> dict[str, Any]:
    for key in fields:
        if key not in FIELDS:
            raise ValueError(f"log context field {key!r} is not an allowed log field")
    return {k: clean(k, v) for k, v in fields.items()}


def set_context(**context: Any) -> None:
    """Fields repeated on every later line of this process (e.g. model_ref once a model is loaded)."""
    global _process
    _process = MappingProxyType({**_process, **_checked(context)})


def bind(**fields: Any) -> Token[Mapping[str, Any]]:
    """Start a request's context (correlation id); undo with ``reset(token)`` in the same task."""
    return _request.set(MappingProxyType(_checked(fields)))


def update(**fields: Any) -> None:
    """Add to the current request's context (job id once admitted, fp6 once authenticated)."""
    _request.set(MappingProxyType({**_request.get(), **_checked(fields)}))


def reset(token: Token[Mapping[str, Any]]) -> None:
    _request.reset(token)


def event(name: str, human: str, *, level: int = logging.INFO, exc: BaseException | None = None, **fields: Any) -> None:
    """Log one named event; ``human`` is a literal template over ``fields`` (see the module doc).

    Fields outside ``FIELDS`` or of the wrong kind are dropped, never printed.
    """
    if not _EVENT_NAME.fullmatch(name):
        raise ValueError(f"log event name {name!r} must be lower_snake_case")
    if not log.isEnabledFor(level):
        return
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None] | None = (
        (type(exc), exc, exc.__traceback__) if exc is not None else None
    )
    log.log(level, name, extra={"event": name, "template": human, "fields": fields}, exc_info=exc_info)
