"""The one typed interface between the scheduler (host) and the model runner (GPU layer).

A step is a list of rows; each row is one sequence's run of tokens to compute
at consecutive positions (a decode row has one token, a prefill chunk many),
its KV block table, and, when the row ends at the sequence's last token, what
to sample. The runner returns one ``Sampled`` per sampling row, in row order.
Plain lists and ints only: the runner owns every device buffer.

Overlap: ``launch`` queues a step and returns at once; the loop schedules and
queues the next step before it reads this one's tokens, so the host's work
hides behind the device's. A token the host does not know yet appears in a
row as ``PENDING``: it is the token the previous launched step sampled for
that sequence, and the runner reads it on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..engine.events import SamplingParams

PENDING = -1  # a token sampled by the step still in flight (the previous launch), read on the device


@dataclass(frozen=True)
class SampleSpec:
    params: SamplingParams
    step: int  # index of the token being drawn (0 = first output): Philox counter, as in a lone run
    history: tuple[int, ...] = ()  # prompt + generated ids, only when repetition_penalty != 1
    generated: tuple[int, ...] = ()  # generated ids, only when presence/frequency penalties are on


@dataclass(frozen=True)
class StepRow:
    seq_id: int
    tokens: tuple[int, ...]  # computed this step, at positions start, start+1, ...
    start: int  # tokens before these already in the KV cache
    block_table: tuple[int, ...]  # KV blocks covering positions [0, start + len(tokens))
    sample: SampleSpec | None  # None: a prefill chunk that does not reach the end of the prompt


@dataclass(frozen=True)
class StepBatch:
    rows: tuple[StepRow, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)

    @property
    def is_decode(self) -> bool:
        return all(len(r.tokens) == 1 and r.sample is not None for r in self.rows)


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class StepRunner(Protocol):
    """What the engine loop needs from the GPU layer (engine/runner.py implements it)."""

    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...  # usable KV blocks (ids 0 .. num_blocks-1)
    @property
    def max_seq_len(self) -> int: ...  # longest sequence (prompt + output) one job may have
    @property
    def vocab_size(self) -> int: ...

    def step(self, batch: StepBatch) -> list[Sampled]: ...

    def launch(self, batch: StepBatch) -> PendingStep:
        """Queue ``batch``; its ``PENDING`` tokens are those the previous launch sampled for the same
        sequences. ``step(b)`` is ``launch(b).result()``."""
        ...


class PendingStep(Protocol):
    def result(self) -> list[Sampled]: ...  # waits for the step; one Sampled per sampling row, in row order
