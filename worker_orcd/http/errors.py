"""One error model on the wire (SPEC 4950-4952): every failure renders as ErrorBody.

Validation messages name the field and the rule but never echo the input:
the input may be a prompt, and prompts never leave the request (4802).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .. import logs
from ..errors import ErrorCode, WorkerError
from . import openai_errors


def error_response(err: WorkerError, path: str | None = None) -> JSONResponse:
    """The error body of the path's façade: ours (SPEC 4951), or OpenAI's under /v1/."""
    headers: dict[str, str] = {}
    if err.code == ErrorCode.AUTH_FAILED:
        headers["WWW-Authenticate"] = 'Bearer realm="worker-orcd"'
    if err.retry_after_ms is not None and err.http_status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_ms / 1000)))
    content = openai_errors.body(err) if openai_errors.is_openai_path(path) else err.to_dict()
    return JSONResponse(content, status_code=err.http_status, headers=headers)


def describe_validation(errors: list[Any], drop_prefix: tuple[str, ...] = ("body", "query")) -> str:
    """'params.temperature: Input should be less than or equal to 2' from pydantic's first error."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    while loc and loc[0] in drop_prefix:
        loc = loc[1:]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field (not allowed)"
    elif first.get("type") == "json_invalid":
        return f"body: not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
    elif first.get("type") == "missing" and not loc:
        return "body: required"
    field = ""
    for part in loc:
        field += f"[{part}]" if part.isdigit() and field else (f".{part}" if field else part)
    if not field and openai_errors.param_of(msg):  # a model-level rule that names its field itself
        return msg
    return f"{field or 'body'}: {msg}"


def invalid_params(errors: list[Any], drop_prefix: tuple[str, ...] = ("body", "query")) -> WorkerError:
    return WorkerError(describe_validation(errors, drop_prefix), code=ErrorCode.INVALID_PARAMS)


def _answer(request: Request, err: WorkerError) -> JSONResponse:
    request.state.outcome = err.code.value  # the request metric's label (middleware.py)
    if err.detail:  # what the caller is not told (paths, file bytes) is the operator's (issue 10, 9)
        logs.event(
            "request_refused", "Refused the request with {code}: {error} ({reason}).",
            level=logging.WARNING, code=err.code.value, error=err.message, reason=err.detail,
        )
    return error_response(err, request.url.path)


def install(app: FastAPI) -> None:
    @app.exception_handler(WorkerError)
    async def _worker_error(request: Request, exc: WorkerError) -> JSONResponse:
        return _answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _answer(request, invalid_params(list(exc.errors())))

    @app.exception_handler(ValidationError)
    async def _model_validation(request: Request, exc: ValidationError) -> JSONResponse:
        return _answer(request, invalid_params(exc.errors(include_url=False, include_input=False)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, WorkerError):  # e.g. the body limit tripped while FastAPI read the body
            return _answer(request, exc.__cause__)
        if exc.status_code == 404:
            err = WorkerError("no such endpoint", code=ErrorCode.NOT_FOUND)
        elif exc.status_code == 405:
            err = WorkerError("method not allowed on this endpoint", code=ErrorCode.INVALID_PARAMS)
            resp = _answer(request, err)
            resp.status_code = 405
            if exc.headers and "Allow" in exc.headers:  # RFC 9110: a 405 names the allowed methods
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        elif exc.status_code < 500:
            err = WorkerError(str(exc.detail), code=ErrorCode.INVALID_PARAMS)
        else:
            err = WorkerError("internal error", code=ErrorCode.INTERNAL)
        return _answer(request, err)
