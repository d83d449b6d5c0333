"""POST /worker/execute (+ alias /execute) and POST /cancel (SPEC 4240-4253, WORK /cancel).

Everything that can be refused with a plain HTTP error is checked before the
stream opens, in this order: auth, body schema, readiness, handle, prompt
characters, prompt tokens, max_tokens, the slot (busy), the seal. After the
``200`` every failure is an SSE ``error`` event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import logs
from ..auth import Caller
from ..errors import ErrorCode, InvalidParams, WorkerError
from ..engine.interface import ResidentModelLike
from ..lifecycle import TokenizerLike, Worker
from ..seal import ModelShardHandle
from .deps import CallerDep, WorkerDep, correlation_id
from .schemas import (
    AcceptedResponse,
    CancelRequest,
    ErrorBody,
    ExecuteRequest,
    SamplingIn,
)
from .sse import MEDIA_TYPE
from .stream import EventStreamResponse, JobStream

DEFAULT_MAX_TOKENS = 256

router = APIRouter()

_SSE_DOC = (
    "Server-Sent Events: `started` {job_id, model, started_at, correlation_id}, one `token` {t, i} per "
    "generated token, an optional `metrics`, then exactly one of `end` {tokens_in, tokens_out, "
    "decode_time_ms, ttft_ms, prefill_ms, stop_reason} or `error` {code, message, retriable, retry_after_ms}. "
    "Comment lines keep the connection alive while the prompt prefills."
)
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "INVALID_PARAMS"},
    401: {"model": ErrorBody, "description": "AUTH_FAILED"},
    404: {"model": ErrorBody, "description": "NOT_FOUND (handle_id)"},
    500: {"model": ErrorBody, "description": "SEAL_VERIFICATION_FAILED / INTERNAL"},
    503: {"model": ErrorBody, "description": "WORKER_BUSY or WORKER_NOT_READY (Retry-After set)"},
}


def _ready_model(worker: Worker) -> tuple[ResidentModelLike, TokenizerLike]:
    model, tokenizer = worker.model, worker.tokenizer
    if not worker.accepting or model is None or tokenizer is None:
        why = "draining" if worker.state.value == "draining" else f"{worker.state.value}, no sealed model is serving"
        raise WorkerError(f"worker is not ready ({why})", code=ErrorCode.WORKER_NOT_READY)
    return model, tokenizer


def _served_handle(worker: Worker) -> ModelShardHandle:
    """The sealed handle of the model being served (host data: the engine knows no handles)."""
    handle = worker.handle
    if handle is None:
        raise WorkerError("worker is not ready (no sealed model is serving)", code=ErrorCode.WORKER_NOT_READY)
    return handle


def _max_tokens(
    worker: Worker, model: ResidentModelLike, requested: int | None, n_prompt: int, field: str = "params.max_tokens"
) -> int:
    """SPEC 4243/4420-4423: requested output within --max-tokens-out and within what the KV cache holds."""
    cfg = worker.config
    room = model.max_seq_len - n_prompt
    if requested is None:
        return max(1, min(DEFAULT_MAX_TOKENS, cfg.max_tokens_out, room))
    if requested > cfg.max_tokens_out:
        raise InvalidParams(f"{field}: {requested} is over the limit of {cfg.max_tokens_out} (--max-tokens-out)")
    if requested > room:
        raise InvalidParams(
            f"{field}: {n_prompt} prompt tokens + {requested} new tokens exceed the context of "
            f"{model.max_seq_len} tokens; at most {room} new tokens fit"
        )
    return requested


async def _prompt_ids(
    worker: Worker, model: ResidentModelLike, tokenizer: TokenizerLike, prompt: str,
    encode: Callable[[str], list[int]] | None = None, field: str = "prompt",
) -> list[int]:
    """SPEC 4242 then 4420: characters first (cheap), then tokens against context / --max-tokens-in.

    ``encode`` replaces ``tokenizer.encode`` where the text already carries its specials (a chat template's).
    """
    cfg = worker.config
    if len(prompt) > cfg.max_prompt_chars:
        raise InvalidParams(f"{field}: {len(prompt)} characters; the limit is {cfg.max_prompt_chars} (--max-prompt-chars)")
    ids = await asyncio.to_thread(encode or tokenizer.encode, prompt)
    if not ids:
        raise InvalidParams(f"{field}: encodes to no tokens")
    limit = model.max_seq_len - 1  # at least one position must remain for output
    source = "the model context minus one output position"
    if cfg.max_tokens_in is not None and cfg.max_tokens_in < limit:
        limit, source = cfg.max_tokens_in, "--max-tokens-in"
    if len(ids) > limit:
        raise InvalidParams(f"{field}: {len(ids)} tokens; the limit is {limit} ({source})")
    return list(ids)


async def start_job(
    request: Request, worker: Worker, caller: Caller, ids: list[int], params: Any,
    job_id: str | None = None, make_stream: Callable[..., JobStream] = JobStream,
) -> JobStream:
    """Admit (or WORKER_BUSY), verify the seal (or leave it to the engine loop), start: what every façade shares.

    ``make_stream`` builds the stream with JobStream's arguments (a subclass renders another wire format).
    """
    job = worker.scheduler.admit(caller.owner, correlation_id(request), job_id)
    request.state.job_id = job.job_id
    logs.update(job_id=job.job_id)
    try:
        model, _ = _ready_model(worker)
        if model.seals_per_step:
            seal_ms = worker.last_seal_ms  # the engine loop verifies before it admits jobs (one check per burst)
        else:
            seal_ms = await worker.verify_seal()
        model, tokenizer = _ready_model(worker)  # a drain or a fatal error may have begun meanwhile
        stream = make_stream(worker, job, model, tokenizer, ids, params, seal_ms, caller.fp6)
        stream.start()
    except BaseException:
        worker.scheduler.finish(job, ok=False)
        raise
    return stream


@router.post(
    "/worker/execute",
    summary="Run a prompt on the sealed model and stream tokens (SSE)",
    response_class=Response,
    responses={200: {"description": _SSE_DOC, "content": {MEDIA_TYPE: {"schema": {"type": "string"}}}}, **_ERRORS},
)
async def execute(
    request: Request,
    body: ExecuteRequest,
    caller: CallerDep,
    worker: WorkerDep,
) -> Response:
    model, tokenizer = _ready_model(worker)
    if body.handle_id is not None and body.handle_id != _served_handle(worker).shard_id:
        raise WorkerError(f"handle_id: no sealed handle {body.handle_id!r} on this worker", code=ErrorCode.NOT_FOUND)
    ids = await _prompt_ids(worker, model, tokenizer, body.prompt)
    max_tokens = _max_tokens(worker, model, body.params.max_tokens, len(ids))
    p = body.params
    params = worker.binding.sampling_params(
        max_tokens=max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, seed=p.seed,
        stop_ids=frozenset(tokenizer.eos_ids) | frozenset(p.stop_token_ids),
    )
    stream = await start_job(request, worker, caller, ids, params, body.job_id)
    return EventStreamResponse(stream, headers={"X-Job-Id": stream.job.job_id})


router.add_api_route(
    "/execute",
    execute,
    methods=["POST"],
    summary="Alias of POST /worker/execute (later worker spec)",
    response_class=Response,
    responses={200: {"description": _SSE_DOC, "content": {MEDIA_TYPE: {"schema": {"type": "string"}}}}, **_ERRORS},
    operation_id="execute_alias",
)


@router.post(
    "/cancel",
    status_code=202,
    response_model=AcceptedResponse,
    summary="Cancel a job (idempotent; only its owner may)",
    responses={
        401: {"model": ErrorBody, "description": "AUTH_FAILED"},
        403: {"model": ErrorBody, "description": "FORBIDDEN: the job belongs to another caller"},
        404: {"model": ErrorBody, "description": "NOT_FOUND: unknown job_id"},
    },
)
async def cancel(
    body: CancelRequest,
    caller: CallerDep,
    worker: WorkerDep,
) -> AcceptedResponse:
    job = worker.scheduler.cancel(body.job_id, caller.owner)
    logs.event(
        "job_cancel",
        "Cancel of job {job_id} accepted from its owner {fp6}: the job is {state} with {tokens_sent} tokens sent; "
        "no token follows this acknowledgement.",
        job_id=job.job_id, fp6=caller.fp6, state=job.state, tokens_sent=job.tokens_sent,
    )
    return AcceptedResponse(job_id=job.job_id, status="cancel_accepted", tokens_sent=job.tokens_sent)
