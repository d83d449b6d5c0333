"""One job inside the batching engine: its tokens, how many are in the KV cache, its blocks and its state."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..engine.events import SamplingParams

_ids = itertools.count()


class SeqStatus(Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # in the batch: has KV blocks
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V is in the cache
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    arrived: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    preemptions: int = 0
    seal_checked: bool = True  # False until a seal check that started after it arrived passed (loop.py)
    stop_reason: str | None = None
    sink: Any = None  # where the engine loop delivers this sequence's events

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]

    def tokens(self, start: int, stop: int) -> tuple[int, ...]:
        n = len(self.prompt)
        if stop <= n:
            return tuple(self.prompt[start:stop])
        if start >= n:
            return tuple(self.output[start - n : stop - n])
        return tuple(self.prompt[start:]) + tuple(self.output[: stop - n])

    @property
    def remaining(self) -> int:
        """Tokens still to compute before the next sample."""
        return self.num_tokens - self.num_computed

    @property
    def drawn_all(self) -> bool:
        """Every output token is drawn (the last may still be in flight): nothing left to schedule."""
        return len(self.output) >= self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
