"""How the paged attention kernel tiles query rows (no Triton: the runner builds tile maps from it)."""

from __future__ import annotations

TILE_ROWS = 16  # query rows (tokens x heads) per tile: the smallest tensor-core M


def tile_shape(n_heads: int, n_kv_heads: int) -> tuple[int, int]:
    """(G_PAD, BLOCK_T): the query heads sharing one kv head padded to a power of two, and tokens per tile."""
    g = n_heads // n_kv_heads
    g_pad = 1 << max(0, (g - 1).bit_length())
    return g_pad, max(1, TILE_ROWS // g_pad)


def block_n(d: int, itemsize: int) -> int:
    """Keys per block: fixed per (head_dim, dtype), i.e. per model."""
    if itemsize == 4:
        return 16
    return 64 if d <= 128 else 32


SPLIT_BLOCKS = 2  # key blocks per split: a row's keys are reduced in splits of this many blocks


def split_keys(d: int, itemsize: int) -> int:
    """Keys per split (S): splits start at absolute positions 0, S, 2S, ... for every row."""
    return SPLIT_BLOCKS * block_n(d, itemsize)


def split_partial_bytes(n_heads: int, n_kv_heads: int, d: int) -> int:
    """Bytes of one slot of the partials scratch: (max, sum) and acc, fp32, for every kv head."""
    g_pad, block_t = tile_shape(n_heads, n_kv_heads)
    block_m = g_pad * block_t
    block_d = max(16, 1 << max(0, (d - 1).bit_length()))
    return n_kv_heads * block_m * (2 + block_d) * 4


SPLIT_SLOTS_SHARED = 1024  # partial slots beyond one full-length row: ~128k keys of a decode batch at S = 128


def split_scratch_slots(s_max: int, s: int) -> int:
    """Slots of the partials scratch: a lone row at the longest context, or a batch whose rows' splits add
    up to SPLIT_SLOTS_SHARED more; a decode step needing more runs in one pass (the same numbers)."""
    return -(-s_max // s) + SPLIT_SLOTS_SHARED
