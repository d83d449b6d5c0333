"""Per-request plumbing as plain ASGI (no buffering, so SSE streams pass straight through).

For every request: a correlation id (``X-Correlation-Id`` validated, or
generated; echoed back, SPEC 4801), a body-size cap enforced while the body
is read, a last-resort catch that turns any escaped exception into INTERNAL
without leaking it, one request log line (with the caller's ``fp6``, 4202)
and the request counter by outcome.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import logs
from ..errors import ErrorCode, WorkerError
from ..metrics import Metrics, outcome
from .errors import error_response

CORRELATION_HEADER = "x-correlation-id"
_CORRELATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
QUIET_PATHS = ("/health", "/metrics")  # probes: logged at debug so they do not drown the journal


class BodyTooLarge(WorkerError):
    code = ErrorCode.INVALID_PARAMS


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics, body_limit: Callable[[Scope], int | None]) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        state: dict[str, Any] = scope.setdefault("state", {})
        status = {"code": 500, "started": False}
        given = headers.get(CORRELATION_HEADER)
        cid = given if given is not None and _CORRELATION.fullmatch(given) else uuid.uuid4().hex
        state["correlation_id"] = cid

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-correlation-id", cid.encode())]
            await send(message)

        limit = self.body_limit(scope)
        received = 0

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if limit is not None and message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"body: the request body exceeds {limit} bytes")
            return message

        try:
            if given is not None and cid != given:
                await error_response(
                    WorkerError(
                        "X-Correlation-Id: must be 1-128 characters of letters, digits, '.', '_', ':', '-'",
                        code=ErrorCode.INVALID_PARAMS,
                    )
                )(scope, receive, send_wrapper)
            elif limit is not None and _content_length(headers) > limit:
                await error_response(BodyTooLarge(f"body: the request body exceeds {limit} bytes"))(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except Exception as exc:  # noqa: BLE001 - last resort: INTERNAL, details only in the log
            logs.event(
                "internal_error", f"Unexpected {type(exc).__name__} while serving {scope['method']} {scope['path']}.",
                level=logging.ERROR, exc=exc, correlation_id=cid, path=scope["path"],
            )
            if not status["started"]:
                await error_response(
                    WorkerError("internal error; details are in the worker log", code=ErrorCode.INTERNAL)
                )(scope, receive, send_wrapper)
        finally:
            code = int(status["code"])
            self.metrics.requests.labels(outcome=outcome(code)).inc()
            path = scope["path"]
            logs.event(
                "http_request", f"{scope['method']} {path} -> {code}",
                level=logging.DEBUG if path in QUIET_PATHS else logging.INFO,
                method=scope["method"], path=path, status=code,
                duration_ms=round((time.perf_counter() - t0) * 1000, 3),
                fp6=state.get("fp6"), correlation_id=cid, job_id=state.get("job_id"),
            )


def _content_length(headers: dict[str, str]) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0
