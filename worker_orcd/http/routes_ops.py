"""GET /health, GET /metrics (both open: liveness and scraping, SPEC 4200) and POST /shutdown."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..lifecycle import State
from .deps import CallerDep, WorkerDep
from .schemas import BatchingView, ErrorBody, HealthResponse, LoadProgress, ShutdownResponse

router = APIRouter()


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Liveness and lifecycle state (no auth)",
    responses={503: {"model": HealthResponse, "description": "a model is loading (status loading, with progress), "
                     "or the worker is stopped"}},
)
async def health(worker: WorkerDep) -> JSONResponse:
    handle = worker.handle
    stopped = worker.state == State.STOPPED
    progress = None if stopped else worker.load_progress  # llama-server's answer while loading (issue 13)
    body = HealthResponse(
        status="stopped" if stopped else "loading" if progress is not None else "ok",
        state=worker.state.value,
        model=handle.model_ref if handle is not None else None,
        vram_bytes=0 if worker.config.dev_mode or worker.model is None else worker.model.vram_bytes(),
        uptime_seconds=round(worker.uptime(), 3),
        worker_id=worker.config.worker_id,
        device=worker.config.device,
        dev_mode=worker.config.dev_mode,
        batching=BatchingView(**worker.batching()),
        progress=LoadProgress(**progress) if progress is not None else None,
    )
    content = body.model_dump(exclude={"progress"} if progress is None else set())
    return JSONResponse(content, status_code=503 if stopped or progress is not None else 200)


@router.get(
    "/metrics",
    summary="Prometheus exposition (no auth)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(worker: WorkerDep) -> Response:
    payload, content_type = worker.metrics.render()
    return Response(payload, media_type=content_type)


@router.post(
    "/shutdown",
    status_code=202,
    response_model=ShutdownResponse,
    summary="Graceful shutdown: drain, finish or cancel the running job, release the device, exit 0",
    responses={401: {"model": ErrorBody, "description": "AUTH_FAILED"}},
)
async def shutdown(_: CallerDep, worker: WorkerDep) -> ShutdownResponse:
    worker.request_shutdown("POST /shutdown")
    return ShutdownResponse(status="draining")
