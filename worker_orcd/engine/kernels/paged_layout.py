"""How the paged attention kernel tiles query rows (no Triton: the runner builds tile maps from it)."""

from __future__ import annotations

TILE_ROWS = 16  # query rows (tokens x heads) per tile: the smallest tensor-core M


def tile_shape(n_heads: int, n_kv_heads: int) -> tuple[int, int]:
    """(G_PAD, BLOCK_T): the query heads sharing one kv head padded to a power of two, and tokens per tile."""
    g = n_heads // n_kv_heads
    g_pad = 1 << max(0, (g - 1).bit_length())
    return g_pad, max(1, TILE_ROWS // g_pad)
