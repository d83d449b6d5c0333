"""Request and response bodies (SPEC 4200-4253, 4300-4305).

Requests are strict: unknown fields are rejected, types are not coerced
("5" is not 5), floats must be finite, and every field has an explicit
bound. Limits that depend on configuration or on the loaded model (prompt
characters, prompt tokens, max_tokens) are checked in the route, after this
static validation, so the OpenAPI document states the hard ceilings only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine.tp_plan import MAX_TP_DEGREE

U64_MAX = 2**64 - 1
PROMPT_CEILING = 10_000_000  # hard cap; --max-prompt-chars (default 100,000) is checked in the route
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"


def prompt_text(v: str) -> str:
    """Text that reaches the tokenizer: no NUL bytes (SPEC 4244), no lone surrogates."""
    if "\0" in v:
        raise ValueError("must not contain NUL bytes (SPEC 4244)")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it contains a lone surrogate)") from None
    return v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SamplingIn(Strict):
    max_tokens: int | None = Field(
        default=None, ge=1, le=1 << 20,
        description="Tokens to generate; at most --max-tokens-out (default 4096) and what the context leaves. "
        "Default: min(256, those limits).",
    )
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_k: int = Field(default=0, ge=0, le=1 << 20, description="0 = off")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0, description="drop tokens below min_p x the top probability; 0 = off")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    seed: int = Field(default=0, ge=0, le=U64_MAX, description="64-bit unsigned; seeds the sampler (SPEC 4712)")
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64, description="extra token ids that end generation")

    @field_validator("stop_token_ids")
    @classmethod
    def _ids(cls, v: list[int]) -> list[int]:
        if any(i < 0 or i >= 1 << 31 for i in v):
            raise ValueError("token ids must be in 0..2^31-1")
        return v


class ExecuteRequest(Strict):
    prompt: str = Field(min_length=1, max_length=PROMPT_CEILING)
    params: SamplingIn = Field(default_factory=SamplingIn)
    handle_id: str | None = Field(
        default=None, pattern=ID_PATTERN, description="shard_id of the sealed handle; optional on one GPU"
    )
    job_id: str | None = Field(default=None, pattern=ID_PATTERN, description="caller-chosen job id; generated when absent")

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, v: str) -> str:
        return prompt_text(v)


class CancelRequest(Strict):
    job_id: str = Field(pattern=ID_PATTERN)


def _refuse_nul(v: str | None) -> str | None:
    """A model reference with NUL is a 400 on every endpoint that takes one (issue 10, defect 10)."""
    if v is not None and "\0" in v:
        raise ValueError("must not contain NUL bytes")
    return v


class PlanRequest(Strict):
    model_ref: str = Field(min_length=1, max_length=4096)
    shard_layout: Literal["single", "tensor_parallel"] = "single"
    tp_degree: int = Field(default=1, ge=1, le=MAX_TP_DEGREE, description="ranks of the tensor-parallel group")

    _no_nul = field_validator("model_ref")(classmethod(lambda cls, v: _refuse_nul(v)))


class CommitRequest(Strict):
    """JSON form of a commit; bytes can instead be streamed (application/octet-stream + these as query)."""

    model_ref: str = Field(min_length=1, max_length=4096, description="the model's name in handles and callbacks")
    model_path: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="path under --model-root, file:/abs URI or shm:NAME; defaults to model_ref",
    )
    shard_id: str | None = Field(default=None, pattern=ID_PATTERN)
    shard_index: int = Field(default=0, ge=0, lt=MAX_TP_DEGREE, description="this worker's --tp-rank (0 on one GPU)")
    total_shards: int = Field(default=1, ge=1, le=MAX_TP_DEGREE, description="this worker's --tp-degree (1 on one GPU)")
    expected_digest: str | None = Field(default=None, pattern=SHA256_PATTERN)

    _no_nul = field_validator("model_ref", "model_path")(classmethod(lambda cls, v: _refuse_nul(v)))
    _shard = model_validator(mode="after")(lambda self: _shard_in_range(self))


def _shard_in_range(req: Any) -> Any:
    if req.shard_index >= req.total_shards:
        raise ValueError(f"shard_index {req.shard_index} must be below total_shards {req.total_shards}")
    return req


class StreamCommitQuery(Strict):
    """Query parameters of a streamed-bytes commit (strings: they come from a URL)."""

    model_config = ConfigDict(extra="forbid", strict=False)
    model_ref: str = Field(min_length=1, max_length=4096)
    shard_id: str | None = Field(default=None, pattern=ID_PATTERN)
    shard_index: int = Field(default=0, ge=0, lt=MAX_TP_DEGREE)
    total_shards: int = Field(default=1, ge=1, le=MAX_TP_DEGREE)
    expected_digest: str | None = Field(default=None, pattern=SHA256_PATTERN)

    _no_nul = field_validator("model_ref")(classmethod(lambda cls, v: _refuse_nul(v)))
    _shard = model_validator(mode="after")(lambda self: _shard_in_range(self))


# --- responses ---------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """The one error shape (SPEC 4951), also the data of the SSE ``error`` event."""

    code: str
    message: str
    retriable: bool
    retry_after_ms: int | None


class HandleView(BaseModel):
    shard_id: str
    gpu_device: int
    vram_bytes: int
    sealed: bool
    sealed_at: str
    digest: str
    model_ref: str
    shard_index: int
    total_shards: int


class CommitResponse(BaseModel):
    handle: HandleView
    sealed: bool
    digest: str


class ShardPlan(BaseModel):
    """One rank's needs (SPEC 4212); with tensor parallel every rank needs the same."""

    shard_index: int
    gpu_device: int | None = Field(description="this worker's device for its own shard; null for the other ranks")
    vram_bytes: int = Field(description="resident once loaded: weights + KV cache + scratch + margin")
    load_peak_bytes: int = Field(description="the most held while loading (tp > 1: the shard plus the split tensors staged whole)")
    weights_bytes: int | None = Field(default=None, description="this shard's weight arena (aligned slots)")
    weights_sharded_bytes: int | None = Field(default=None, description="its 1/T of the split tensors")
    weights_replicated_bytes: int | None = Field(default=None, description="the tensors every rank holds whole")
    kv_cache_bytes: int | None = Field(default=None, description="its 1/T of the KV cache (KV heads split)")


class PlanResponse(BaseModel):
    feasible: bool
    dev_mode: bool = Field(description="CPU development mode: vram_required/vram_free count host memory, not VRAM")
    vram_required: int
    vram_free: int
    shard_plan: list[ShardPlan]
    reasons: list[str] = Field(description="why not feasible; empty when feasible")
    digest: str
    mcd: dict[str, Any]
    plan: dict[str, Any] = Field(description="the engine's breakdown: weights, KV cache, scratch, margin, dtype, max_seq_len")


class BatchingView(BaseModel):
    """Continuous batching at a glance (issue 8): slots = jobs the engine runs at once."""

    slots_total: int
    slots_busy: int
    queue_depth: int
    queue_limit: int


class ReadyResponse(BaseModel):
    ready: bool
    state: str
    handles: list[HandleView]
    nccl_group_id: str | None = None
    device: Literal["cuda", "cpu"]
    dev_mode: bool
    batching: BatchingView


class LoadProgress(BaseModel):
    """How far the model load is (``/health`` while ``status`` is ``loading``)."""

    phase: Literal["validate", "upload", "capture", "seal"] = Field(
        description="validate: hash, signature, GGUF and capability checks; upload: tensor bytes streamed to the "
        "device; capture: kernel warm-up and decode-graph capture; seal: seal verified over the resident bytes"
    )
    bytes_done: int = Field(description="tensor bytes uploaded so far")
    bytes_total: int | None = Field(description="tensor bytes to upload; null until the upload starts")


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "stopped"]
    state: str
    model: str | None
    vram_bytes: int
    uptime_seconds: float
    worker_id: str
    device: Literal["cuda", "cpu"]
    dev_mode: bool
    batching: BatchingView
    progress: LoadProgress | None = Field(default=None, description="only while a model loads (status loading, 503)")


class AcceptedResponse(BaseModel):
    job_id: str
    status: Literal["cancel_accepted"]
    tokens_sent: int = Field(
        description="token events the job's stream had sent when the cancel was acknowledged; "
        "no token follows them (SPEC 4252)"
    )


class ShutdownResponse(BaseModel):
    status: Literal["draining"]
