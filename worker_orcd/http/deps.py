"""Request dependencies: the worker, and the authenticated caller (SPEC 4200-4203)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import logs
from ..auth import BearerAuth, Caller
from ..lifecycle import Worker

# Declares the scheme in /openapi.json; the check itself reads the raw header (constant-time, our error model).
bearer_scheme = HTTPBearer(auto_error=False, description="token from the worker's API token file")


def _worker(request: Request) -> Worker:
    worker: Worker = request.app.state.worker
    return worker


# Every dependency here is async on purpose: FastAPI runs a sync one on a worker thread, a thread hop
# per request whose GIL hand-offs stall the event loop (and the token streams it writes).
async def get_worker(request: Request) -> Worker:
    return _worker(request)


def _authenticate(request: Request) -> Caller:
    known = getattr(request.state, "caller", None)  # the middleware authenticated before the body was read
    if isinstance(known, Caller):
        return known
    auth: BearerAuth = request.app.state.auth
    caller = auth.authenticate(request.headers.get("authorization"))
    request.state.fp6 = caller.fp6  # picked up by the request log line
    logs.update(fp6=caller.fp6)  # ...and by every other line of this request
    return caller


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


# async also because a worker thread's context changes (the fp6 above) would not reach the request's task.
async def require_caller(request: Request, _: BearerCredentials) -> Caller:
    return _authenticate(request)


async def caller_unless_ready_open(request: Request, _: BearerCredentials) -> Caller | None:
    """SPEC 4200: /worker/ready MAY be open by configuration (--ready-open)."""
    if _worker(request).config.ready_open and not request.headers.get("authorization"):
        return None
    return _authenticate(request)


def correlation_id(request: Request) -> str:
    return str(request.state.correlation_id)


WorkerDep = Annotated[Worker, Depends(get_worker)]
CallerDep = Annotated[Caller, Depends(require_caller)]
ReadyCallerDep = Annotated[Caller | None, Depends(caller_unless_ready_open)]
