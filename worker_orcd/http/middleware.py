"""Per-request plumbing as plain ASGI (no buffering, so SSE streams pass straight through).

For every request: a correlation id, a body-size cap enforced while the body
is read, a last-resort catch that turns any escaped exception into INTERNAL
without leaking it, one request log line (with the caller's ``fp6``, 4202)
and the request counter by outcome.

Correlation ids (SPEC 4801): a client's ``X-Correlation-Id`` is used when it
is 1-128 characters of ``[A-Za-z0-9._:-]`` starting with a letter or digit;
otherwise the request is refused with 400 ``INVALID_PARAMS`` naming the
header (silently replacing it would break the client's own tracing without
telling it). Without the header a uuid4 (32 hex digits) is generated. The id
is echoed in every response's ``X-Correlation-Id`` header and in the SSE
``started`` event, and bound to the log context so that every line logged
while the request is served carries it.

The log line never holds the raw request target: the path is logged only
when it is one of the app's routes (anything else reads ``(unmatched)``),
and the query string is never looked at.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import logs
from ..auth import AuthError, BearerAuth
from ..errors import ErrorCode, WorkerError
from ..metrics import Metrics, outcome
from .errors import error_response

CORRELATION_HEADER = "x-correlation-id"
CORRELATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
QUIET_PATHS = ("/health", "/metrics")  # probes: logged at debug so they do not drown the journal
UNMATCHED = "(unmatched)"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BodyTooLarge(WorkerError):
    code = ErrorCode.INVALID_PARAMS


class RequestContext:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, body_limit: Callable[[Scope], int | None], paths: Collection[str] = (),
        auth: BearerAuth | None = None, protected: Collection[str] = (),
        not_ready: Callable[[Scope], WorkerError | None] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit
        self.paths = frozenset(paths)
        self.auth = auth
        self.protected = frozenset(protected)
        self.not_ready = not_ready  # asked after authentication: a refusal for this protected route, or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        state: dict[str, Any] = scope.setdefault("state", {})
        status = {"code": 500, "started": False}
        given = headers.get(CORRELATION_HEADER)
        cid = given if given is not None and CORRELATION_ID.fullmatch(given) else uuid.uuid4().hex
        state["correlation_id"] = cid
        token = logs.bind(correlation_id=cid)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-correlation-id", cid.encode())]
            await send(message)

        async def refuse(err: WorkerError) -> None:
            state["outcome"] = err.code.value
            await error_response(err, scope.get("path"))(scope, receive, send_wrapper)

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
                await refuse(
                    WorkerError(
                        "X-Correlation-Id: must be 1-128 characters of letters, digits, '.', '_', ':', '-', "
                        "starting with a letter or digit",
                        code=ErrorCode.INVALID_PARAMS,
                    )
                )
            elif (denied := self._authenticate(scope, state, headers)) is not None:
                await refuse(denied)
            elif (unready := self._not_ready(scope)) is not None:
                await refuse(unready)
            elif limit is not None and _content_length(headers) > limit:
                await refuse(BodyTooLarge(f"body: the request body exceeds {limit} bytes"))
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except Exception as exc:  # noqa: BLE001 - last resort: INTERNAL, details only in the log
            logs.event(
                "internal_error", "Unexpected {exc_type} while serving {method} {path}; the client got INTERNAL.",
                level=logging.ERROR, exc=exc, method=self._method(scope), path=self._path(scope),
            )
            if not status["started"]:
                await refuse(WorkerError("internal error; details are in the worker log", code=ErrorCode.INTERNAL))
            else:
                state["outcome"] = ErrorCode.INTERNAL.value
        finally:
            code = int(status["code"])
            result = outcome(code, state.get("outcome"))
            self.metrics.requests.labels(outcome=result).inc()
            path = self._path(scope)
            logs.event(
                "http_request", "{method} {path} answered {status} ({outcome}) after {duration_ms:.1f} ms.",
                level=logging.DEBUG if path in QUIET_PATHS else logging.INFO,
                method=self._method(scope), path=path, status=code, outcome=result,
                duration_ms=round((time.perf_counter() - t0) * 1000, 3), fp6=state.get("fp6"), job_id=state.get("job_id"),
            )
            logs.reset(token)

    def _authenticate(self, scope: Scope, state: dict[str, Any], headers: dict[str, str]) -> AuthError | None:
        """Authenticate before the body is read or parsed: a stranger's body costs nothing (issue 10, 6).

        Only for routes that need a caller; the caller is kept in the request state, where the
        route's dependency picks it up. Returns the refusal, or None to go on.
        """
        if self.auth is None or scope.get("path") not in self.protected:
            return None
        try:
            caller = self.auth.authenticate(headers.get("authorization"))
        except AuthError as e:
            return e
        state["caller"], state["fp6"] = caller, caller.fp6
        logs.update(fp6=caller.fp6)
        return None

    def _not_ready(self, scope: Scope) -> WorkerError | None:
        if self.not_ready is None or scope.get("path") not in self.protected:
            return None
        return self.not_ready(scope)

    def _path(self, scope: Scope) -> str:
        path = str(scope.get("path", ""))
        return path if path in self.paths else UNMATCHED

    @staticmethod
    def _method(scope: Scope) -> str:
        method = str(scope.get("method", ""))
        return method if method in _METHODS else "OTHER"


def _content_length(headers: dict[str, str]) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0
