"""Which rows run in the next step: decode rows and prefill chunks under a token budget.

Policy (vLLM v1 / nano-vllm style, one unified queue):

* Running sequences first, oldest first: each gets ``min(remaining, budget)``
  tokens (1 for a decode row; a chunk of its prompt while it prefills), so a
  long prompt is cut into chunks and never stalls the running streams.
* When a running sequence needs a KV block and none is free, the youngest
  running sequence is preempted: its blocks are freed and it goes back to the
  head of the wait queue, to be recomputed from its prompt plus the tokens it
  already produced (nothing is re-emitted: see loop.py).
* Then waiting sequences, first come first served, while there are free
  batch slots, budget and blocks, up to the first one whose seal check has
  not passed yet (``seal_checked``, set by the loop). A waiting sequence never preempts a running
  one (no thrashing).

The budget and the batch size bound the work of one step; every sequence's
state moves only here and in ``finish``/``preempt``. While any running
sequence decodes, a step holds at most ``mixed_budget`` tokens (never fewer
than the decode rows): prompt chunks then wait a step rather than stretch the
gap between two tokens of every running stream (p99 inter-token latency); a
step with no decode row (prefill alone) takes the full ``token_budget``.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, SeqStatus
from .step import SampleSpec, StepBatch, StepRow


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, token_budget: int,
                 mixed_budget: int | None = None) -> None:
        if max_batch < 1 or token_budget < 1 or (mixed_budget is not None and mixed_budget < 1):
            raise ValueError(f"max_batch, token_budget and mixed_budget must be >= 1, got {max_batch}, "
                             f"{token_budget}, {mixed_budget}")
        self.blocks = blocks
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.mixed_budget = token_budget if mixed_budget is None else min(mixed_budget, token_budget)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.preemptions = 0

    # --- membership --------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove ``seq`` wherever it is and free its blocks (idempotent)."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.stop_reason = reason

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s KV and queue it (first) for recomputation."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ----------------------------------------------------------------------------

    def schedule(self) -> tuple[StepBatch, list[Sequence]]:
        """The next step's rows and, for each row, its sequence (same order)."""
        budget = self.token_budget
        bs = self.blocks.block_size
        decoding = sum(1 for seq in self.running if seq.remaining == 1 and not seq.drawn_all)
        if decoding:
            budget = max(self.mixed_budget, min(decoding, budget))
        chosen: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING or seq.drawn_all:  # preempted below; or its last token is
                continue  # in flight (the loop ends it when it reads that token)
            n = min(seq.remaining, budget)
            if seq.num_computed + n > len(seq.block_table) * bs:  # needs another block (else: nothing to do)
                while not self.blocks.can_grow(seq, n):
                    victim = self.running[-1]
                    self.preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    continue
                self.blocks.grow(seq, n)
            chosen.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if seq.drawn_all:  # preempted with its last token in flight: the loop ends it next
                break
            if not seq.seal_checked:  # its seal check is still running (loop.py); FCFS: none behind it
                break
            n = min(seq.remaining, budget)
            if not self.blocks.can_grow(seq, n):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n
        rows = tuple(self._row(seq, n) for seq, n in chosen)
        return StepBatch(rows), [seq for seq, _ in chosen]

    @staticmethod
    def _row(seq: Sequence, n: int) -> StepRow:
        start = seq.num_computed
        sample = None
        if start + n == seq.num_tokens:
            p = seq.params
            sample = SampleSpec(
                params=p,
                step=len(seq.output),
                history=seq.tokens(0, seq.num_tokens) if p.repetition_penalty != 1.0 else (),
                generated=tuple(seq.output) if (p.presence_penalty or p.frequency_penalty) else (),
            )
        return StepRow(seq.seq_id, seq.tokens(start, start + n), start, tuple(seq.block_table), sample)
