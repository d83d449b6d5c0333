"""Errors on /v1/* in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

``code`` is our stable ErrorCode (so an orchestrator reads the same codes on both
façades), the HTTP status is the one CODE_INFO gives it, and ``param`` names the
field when the message starts with one ("max_tokens: ..."), which is how every
INVALID_PARAMS message of this worker is phrased.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ErrorCode, WorkerError

PREFIX = "/v1/"
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\]|\.[A-Za-z_][A-Za-z0-9_]*)*): ")

_TYPES: dict[ErrorCode, str] = {
    ErrorCode.INVALID_PARAMS: "invalid_request_error",
    ErrorCode.AUTH_FAILED: "authentication_error",
    ErrorCode.FORBIDDEN: "permission_error",
    ErrorCode.NOT_FOUND: "not_found_error",
    ErrorCode.CANCELLED: "invalid_request_error",
    ErrorCode.WORKER_BUSY: "server_busy_error",
    ErrorCode.WORKER_NOT_READY: "server_busy_error",
    ErrorCode.INFERENCE_TIMEOUT: "timeout_error",
}


def param_of(message: str) -> str | None:
    m = _FIELD.match(message)
    return m.group(1) if m and m.group(1) not in ("body", "messages_text") else None


def body(err: WorkerError) -> dict[str, Any]:
    return {"error": {
        "message": err.message,
        "type": _TYPES.get(err.code, "server_error"),
        "param": param_of(err.message),
        "code": err.code.value,
    }}


def is_openai_path(path: str | None) -> bool:
    return bool(path) and str(path).startswith(PREFIX)
