"""POST /worker/plan, POST /worker/commit, GET /worker/ready (SPEC 4210-4232).

A commit names the model either by reference (JSON body: a path under the
model root, a ``file:`` URI or ``shm:NAME``) or streams its bytes
(``application/octet-stream``, metadata in the query). Streamed bytes are
staged in a private directory, capped at MAX_MODEL_SIZE while they arrive,
then go through exactly the same validation as a file reference.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from ..engine.tp_plan import MAX_TP_DEGREE
from ..errors import ErrorCode, InvalidParams, ModelLoadError, WorkerError
from ..lifecycle import Commit, Worker
from ..seal import ModelShardHandle
from .deps import CallerDep, ReadyCallerDep, WorkerDep
from .errors import invalid_params
from .schemas import (
    BatchingView,
    CommitRequest,
    CommitResponse,
    ErrorBody,
    HandleView,
    PlanRequest,
    PlanResponse,
    ReadyResponse,
    StreamCommitQuery,
)

MAX_COMMIT_JSON = 64 * 1024
STAGED_NAME = "upload.gguf"

router = APIRouter()

_LOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "INVALID_PARAMS"},
    401: {"model": ErrorBody, "description": "AUTH_FAILED"},
    422: {"model": ErrorBody, "description": "MODEL_LOAD_FAILED / CAPABILITY_MISMATCH"},
    503: {"model": ErrorBody, "description": "WORKER_NOT_READY / WORKER_BUSY / HOST_OOM (commit: no disk space to stage)"},
    507: {"model": ErrorBody, "description": "INSUFFICIENT_VRAM"},
}


def _view(handle: ModelShardHandle) -> HandleView:
    return HandleView.model_validate(handle.public())


@router.post("/worker/plan", response_model=PlanResponse, summary="Would this model fit and run here?", responses=_LOAD_ERRORS)
async def plan(
    body: PlanRequest,
    _: CallerDep,
    worker: WorkerDep,
) -> PlanResponse:
    if body.shard_layout == "single" and body.tp_degree != 1:
        raise InvalidParams("tp_degree: must be 1 when shard_layout is 'single'")
    return PlanResponse.model_validate(await worker.plan(body.model_ref, body.tp_degree))


_COMMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": CommitRequest.model_json_schema()},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "the GGUF bytes; model_ref, shard_id, shard_index, total_shards, "
                "expected_digest go in the query string",
            },
        },
    },
    "parameters": [
        {"name": "model_ref", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "octet-stream commits only"},
        {"name": "shard_id", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "shard_index", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 0, "maximum": MAX_TP_DEGREE - 1}},
        {"name": "total_shards", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TP_DEGREE}},
        {"name": "expected_digest", "in": "query", "required": False,
         "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}},
    ],
}


@router.post(
    "/worker/commit",
    response_model=CommitResponse,
    summary="Load a model into device memory and seal it (one model per process)",
    openapi_extra=_COMMIT_BODY,
    responses=_LOAD_ERRORS,
)
async def commit(
    request: Request,
    _: CallerDep,
    worker: WorkerDep,
) -> CommitResponse:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await _read_capped(request, MAX_COMMIT_JSON)
        try:
            req = CommitRequest.model_validate_json(raw)
        except ValidationError as e:
            raise invalid_params(e.errors(include_url=False, include_input=False)) from None
        spec = Commit(
            model_ref=req.model_ref, source=req.model_path or req.model_ref, model_root=worker.config.model_root,
            expected_sha256=req.expected_digest, shard_id=req.shard_id, shard_index=req.shard_index,
            total_shards=req.total_shards,
        )
        handle, created = await worker.commit(spec)
    elif ctype == "application/octet-stream":
        try:
            q = StreamCommitQuery.model_validate(dict(request.query_params))
        except ValidationError as e:
            raise invalid_params(e.errors(include_url=False, include_input=False)) from None
        if worker.handle is not None:
            # Refused before a byte is stored (issue 10, defect 3): a sealed worker never needs model
            # bytes again, whatever the query claims. A JSON commit naming the file repeats one.
            raise ModelLoadError(
                f"this worker already holds model {worker.handle.model_ref!r}; one model per process (SPEC 4022), "
                "and a streamed commit is accepted only before the first model is sealed"
            )
        lock = _staging_lock(request)
        if lock.locked():  # one body on disk at a time: N parallel uploads would need N times the space
            raise WorkerError("another streamed commit is being received", code=ErrorCode.WORKER_BUSY)
        async with lock:
            staged = await _stage_body(request, worker)
            try:
                spec = Commit(
                    model_ref=q.model_ref, source=STAGED_NAME, model_root=staged, expected_sha256=q.expected_digest,
                    shard_id=q.shard_id, shard_index=q.shard_index, total_shards=q.total_shards,
                )
                handle, created = await worker.commit(spec)
            finally:
                await asyncio.to_thread(shutil.rmtree, staged, True)
    else:
        raise InvalidParams("Content-Type: must be application/json (a model reference) or application/octet-stream (the bytes)")
    if created:
        worker.after_commit()
    return CommitResponse(handle=_view(handle), sealed=handle.sealed, digest=handle.digest)


async def _read_capped(request: Request, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise InvalidParams(f"body: the request body exceeds {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _staging_lock(request: Request) -> asyncio.Lock:
    state = request.app.state
    if not hasattr(state, "staging_lock"):
        state.staging_lock = asyncio.Lock()
    lock: asyncio.Lock = state.staging_lock
    return lock


def _no_space(needed: int, free: int) -> WorkerError:
    return WorkerError(
        f"not enough disk space to stage the model: {needed} bytes needed, {free} free in the upload directory",
        code=ErrorCode.HOST_OOM,
    )


async def _disk(call: Any, arg: Any, size: int) -> None:
    """A write or close of the staged file; a full disk (ENOSPC) is HOST_OOM, not INTERNAL."""
    try:
        await asyncio.to_thread(call, *(() if arg is None else (arg,)))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise _no_space(size, 0) from None


async def _stage_body(request: Request, worker: Worker) -> Path:
    """Write the body to a private temp dir, refusing it the moment it passes the size cap (SPEC 4225).

    The free space of the upload directory is checked against the declared length before a
    byte is written, and a disk that fills up while writing is refused the same way (HOST_OOM).
    """
    cap = worker.config.max_model_size_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ModelLoadError(f"model body is {declared} bytes, over the MAX_MODEL_SIZE limit of {cap} bytes")
    base = worker.config.upload_dir
    free = (await asyncio.to_thread(shutil.disk_usage, base or tempfile.gettempdir())).free
    if declared is not None and declared.isdigit() and int(declared) > free:
        raise _no_space(int(declared), free)
    staged = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="worker-orcd-upload-", dir=base))
    try:
        size = 0
        fh = await asyncio.to_thread(open, staged / STAGED_NAME, "xb")
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise ModelLoadError(f"model body exceeds the MAX_MODEL_SIZE limit of {cap} bytes")
                if size > free:  # a body without Content-Length may not fill the disk either
                    raise _no_space(size, free)
                await _disk(fh.write, chunk, size)
        finally:
            await _disk(fh.close, None, size)
        if size == 0:
            raise InvalidParams("body: an octet-stream commit needs the model bytes in the body")
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staged, True)
        raise
    return staged


@router.get(
    "/worker/ready",
    response_model=ReadyResponse,
    summary="Is a sealed model serving? (open with --ready-open)",
    responses={401: {"model": ErrorBody, "description": "AUTH_FAILED"}},
)
async def ready(
    _: ReadyCallerDep,
    worker: WorkerDep,
) -> ReadyResponse:
    handle = worker.handle
    ok = worker.accepting and handle is not None and handle.sealed
    return ReadyResponse(
        ready=ok,
        state=worker.state.value,
        handles=[_view(handle)] if handle is not None and worker.state.value != "stopped" else [],
        nccl_group_id=worker.config.tp_group_id,  # the tensor-parallel group (gloo on the CPU), null on one device
        device=worker.config.device,
        dev_mode=worker.config.dev_mode,
        batching=BatchingView(**worker.batching()),
    )
