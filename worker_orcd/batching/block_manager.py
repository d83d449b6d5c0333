"""Fixed-size KV blocks: a free list, per-sequence block tables, exact accounting.

Block ids index the runner's paged KV tensors. Allocation is lazy: a
sequence holds exactly the blocks covering the tokens it has computed or is
about to compute in this step, so memory follows real lengths, not
``max_tokens``. Blocks are handed out lowest id first (deterministic layouts
make runs reproducible and debuggable).
"""

from __future__ import annotations

import heapq

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks))
        heapq.heapify(self._free)
        self._owner: dict[int, int] = {}  # block -> seq_id (catches double allocation)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def needed(self, seq: Sequence, n_new: int) -> int:
        """Extra blocks ``seq`` needs to compute ``n_new`` more tokens."""
        return max(0, self.blocks_for(seq.num_computed + n_new) - len(seq.block_table))

    def can_grow(self, seq: Sequence, n_new: int) -> bool:
        return self.needed(seq, n_new) <= len(self._free)

    def grow(self, seq: Sequence, n_new: int) -> None:
        need = self.needed(seq, n_new)
        if need > len(self._free):
            raise RuntimeError(f"sequence {seq.seq_id} needs {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            b = heapq.heappop(self._free)
            assert b not in self._owner, f"block {b} allocated twice"
            self._owner[b] = seq.seq_id
            seq.block_table.append(b)

    def free(self, seq: Sequence) -> None:
        for b in seq.block_table:
            owner = self._owner.pop(b, None)
            assert owner == seq.seq_id, f"block {b} freed by {seq.seq_id}, owned by {owner}"
            heapq.heappush(self._free, b)
        seq.block_table.clear()

    def check(self) -> None:
        """Invariant: every block is either free or owned, never both (tests call this)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is free twice"
        assert not free & self._owner.keys(), "a block is both free and owned"
        assert len(free) + len(self._owner) == self.num_blocks, "a block leaked"
