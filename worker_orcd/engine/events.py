"""What crosses the GPU boundary per request (SPEC 4400): sampling settings in, token events out.

Plain dataclasses with no torch import, so the host layer and its tests can
build and read them without loading the GPU stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

StopReason = Literal["eos", "max_tokens", "cancelled"]

MAX_LOGPROBS = 20  # top alternatives per token the engine returns at most (OpenAI's limit)


class TokenConstraint(Protocol):
    """A host-side grammar matcher that restricts sampling (structured output).

    The engine calls ``allowed()`` before sampling each token of the row and
    ``accept(token_id)`` after; the mask is applied inside the batched sampler
    to that row only. ``allowed()`` returns a packed bitmask: a numpy int32
    array of ceil(vocab/32) words, bit ``t % 32`` of word ``t // 32`` set when
    token ``t`` may follow (ids past the array's range are disallowed). It is
    called on the engine's thread; it must be cheap and must not raise.
    """

    def allowed(self) -> Any: ...

    def accept(self, token_id: int) -> None: ...


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    # OpenAI-style additive penalties over the tokens generated so far (not the prompt):
    # logit -= presence * [count > 0] + frequency * count. Range [-2, 2].
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # logprobs: each TokenEvent carries the chosen token's log-probability; top_logprobs (0..20):
    # that many most likely alternatives too. Both from the raw model distribution (before penalties,
    # temperature and truncation), as vLLM reports them.
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: TokenConstraint | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class TokenEvent:
    index: int
    token_id: int
    # With SamplingParams.logprobs: log-softmax of the raw (unpenalised, untempered) logits at this step
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationEnd:
    tokens_in: int
    tokens_out: int
    stop_reason: StopReason
    prefill_ms: float
    ttft_ms: float
    decode_time_ms: float
    queue_ms: float = 0.0  # admitted -> first scheduled (batching engine)
    preemptions: int = 0  # times this job was preempted and recomputed
