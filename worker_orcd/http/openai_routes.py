"""The OpenAI-compatible façade: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

A second door onto the same path as /worker/execute: the same bearer auth
(the SDK's ``api_key``), the same limits (prompt characters and tokens,
max tokens, NUL bytes), the same admission and seal check (``start_job``),
the same engine thread, cancel-on-disconnect, metrics and redacted logs.
Only the request shape, the chat template, stop strings, structured output
and the wire format differ.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..chat_template import ChatTemplate
from ..errors import ErrorCode, InvalidParams, WorkerError
from ..engine.interface import ResidentModelLike
from ..lifecycle import TokenizerLike, Worker
from ..seal import ModelShardHandle
from ..structured_output import StructuredOutput
from .deps import CallerDep, WorkerDep
from .openai_schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from .openai_stream import CompletionResponse, OpenAIOptions, OpenAIStream
from .routes_execute import _max_tokens, _prompt_ids, _ready_model, _served_handle, start_job
from .stream import EventStreamResponse

router = APIRouter(prefix="/v1", tags=["openai"])
_OPENAI_ERROR = {"description": 'OpenAI\'s error shape: {"error": {"message", "type", "param", "code"}}'}
_ERRORS: dict[int | str, dict[str, Any]] = {s: _OPENAI_ERROR for s in (400, 401, 404, 500, 503)}


class ModelTools:
    """Per served model, built on first use: its chat template and its grammar compiler."""

    def __init__(self, template_file: Path | None) -> None:
        self._override = template_file.read_text(encoding="utf-8") if template_file is not None else None
        self._lock = threading.Lock()
        self._for: int | None = None
        self._template: ChatTemplate | None = None
        self._structured: StructuredOutput | None = None

    def _build(self, model: ResidentModelLike, tokenizer: TokenizerLike) -> None:
        with self._lock:
            if self._for == id(tokenizer):
                return
            source = self._override or getattr(tokenizer, "chat_template", None)
            self._template = ChatTemplate.for_tokenizer(source, tokenizer) if source else None
            rows = getattr(getattr(model, "config", None), "vocab_size", None) or tokenizer.vocab_size  # type: ignore[attr-defined]
            self._structured = StructuredOutput(tokenizer, rows)
            self._for = id(tokenizer)

    def template(self, model: ResidentModelLike, tokenizer: TokenizerLike) -> ChatTemplate:
        self._build(model, tokenizer)
        if self._template is None:
            raise InvalidParams(
                "messages: this model has no chat template (tokenizer.chat_template); use /v1/completions, "
                "or start the worker with --chat-template FILE"
            )
        return self._template

    def structured(self, model: ResidentModelLike, tokenizer: TokenizerLike) -> StructuredOutput:
        self._build(model, tokenizer)
        assert self._structured is not None
        return self._structured


def _tools(request: Request) -> ModelTools:
    tools: ModelTools = request.app.state.openai_tools
    return tools


def _check_model(body: _Sampling, handle: ModelShardHandle) -> None:
    if body.model != handle.model_ref:
        raise WorkerError(
            f"model: {body.model!r} is not served here; GET /v1/models names the one model ({handle.model_ref!r})",
            code=ErrorCode.NOT_FOUND,
        )


def fingerprint(handle: ModelShardHandle) -> str:
    """system_fingerprint: changes exactly when the served weights (their digest) change."""
    return "fp_" + handle.digest[:16]


async def _run(
    request: Request, body: ChatCompletionRequest | CompletionRequest, caller: Any, worker: Worker,
    model: ResidentModelLike, tokenizer: TokenizerLike, ids: list[int], kind: str,
) -> Response:
    requested, field = body.output_limit
    max_tokens = _max_tokens(worker, model, requested, len(ids), field)
    constraint = None
    if body.response_format is not None and body.response_format.type != "text":
        so = _tools(request).structured(model, tokenizer)
        constraint = await asyncio.to_thread(so.constraint, body.response_format.as_dict())
    if isinstance(body, ChatCompletionRequest):
        logprobs, top = bool(body.logprobs), body.top_logprobs or 0
    else:
        logprobs, top = body.logprobs is not None, body.logprobs or 0
    seed = secrets.randbits(64) if body.seed is None else body.seed % (1 << 64)  # OpenAI's seeds are signed
    params = worker.binding.sampling_params(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p, min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0, seed=seed,
        stop_ids=frozenset(tokenizer.eos_ids),
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        logprobs=logprobs, top_logprobs=top, constraint=constraint,
    )
    handle = _served_handle(worker)
    opts = OpenAIOptions(
        kind=kind, stream=bool(body.stream), include_usage=bool(body.stream_options and body.stream_options.include_usage),
        stops=body.stops, logprobs=logprobs, top_logprobs=top, model_id=handle.model_ref,
        fingerprint=fingerprint(handle),
    )
    stream = await start_job(request, worker, caller, ids, params, make_stream=partial(OpenAIStream, opts=opts))
    assert isinstance(stream, OpenAIStream)
    headers = {"X-Job-Id": stream.job.job_id}
    if opts.stream:
        return EventStreamResponse(stream, headers=headers)
    return CompletionResponse(stream, headers=headers)


@router.get("/models", summary="The sealed model (OpenAI list shape)", responses=_ERRORS)
async def list_models(caller: CallerDep, worker: WorkerDep) -> JSONResponse:
    handle = worker.handle
    data = []
    if handle is not None:
        created = int(datetime.fromisoformat(handle.sealed_at).timestamp()) if handle.sealed_at else 0
        data.append({"id": handle.model_ref, "object": "model", "created": created, "owned_by": worker.config.worker_id})
    return JSONResponse({"object": "list", "data": data})


@router.post(
    "/chat/completions", summary="Chat with the model's chat template (OpenAI)", response_class=Response,
    responses={200: {"description": "chat.completion JSON, or with stream: SSE chat.completion.chunk lines then "
                     "`data: [DONE]`"}, **_ERRORS},
)
async def chat_completions(request: Request, body: ChatCompletionRequest, caller: CallerDep, worker: WorkerDep) -> Response:
    model, tokenizer = _ready_model(worker)
    _check_model(body, _served_handle(worker))
    template = _tools(request).template(model, tokenizer)
    messages = [m.for_template() for m in body.messages]
    text = await asyncio.to_thread(template.render, messages, add_generation_prompt=True)
    # The template writes the specials (BOS included) itself: encode without adding them again.
    encode = partial(tokenizer.encode, add_bos=False, add_eos=False)  # type: ignore[call-arg]
    ids = await _prompt_ids(worker, model, tokenizer, text, encode=encode, field="messages")
    return await _run(request, body, caller, worker, model, tokenizer, ids, "chat")


@router.post(
    "/completions", summary="Complete a prompt (OpenAI legacy completions)", response_class=Response,
    responses={200: {"description": "text_completion JSON, or with stream: SSE chunks then `data: [DONE]`"},
               **_ERRORS},
)
async def completions(request: Request, body: CompletionRequest, caller: CallerDep, worker: WorkerDep) -> Response:
    model, tokenizer = _ready_model(worker)
    _check_model(body, _served_handle(worker))
    ids = await _prompt_ids(worker, model, tokenizer, body.text)
    return await _run(request, body, caller, worker, model, tokenizer, ids, "text")


