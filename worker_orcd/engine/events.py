"""What crosses the GPU boundary per request (SPEC 4400): sampling settings in, token events out.

Plain dataclasses with no torch import, so the host layer and its tests can
build and read them without loading the GPU stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

StopReason = Literal["eos", "max_tokens", "cancelled"]


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


@dataclass(frozen=True)
class TokenEvent:
    index: int
    token_id: int


@dataclass(frozen=True)
class GenerationEnd:
    tokens_in: int
    tokens_out: int
    stop_reason: StopReason
    prefill_ms: float
    ttft_ms: float
    decode_time_ms: float
