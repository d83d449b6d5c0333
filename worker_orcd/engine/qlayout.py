"""The repackings of GGUF blocks the quantized residency makes: Q8_0, Q6_K, Q4_0, Q4_1, Q5_0 and
Q5_1 split into planes; Q8_0, Q4_K and Q6_K (fp16 models; the K-quants under ``quantized-half2``) in the
tensor core's fragment order.

Why: their blocks (34, 210, 18, 20, 22 and 24 bytes) are not 16-byte aligned, so a kernel reading
them in place issues one load per byte; a Q4_K block (144 bytes) is 16-byte aligned
and stays as it is. The repacking moves each field of every block into its own plane
(all rows' first fields, then all rows' second fields, ...), row order and block order
kept: same bytes, same total size (resident bytes = file bytes), every load aligned.
It is made on the device right after the hashed upload, a fixed permutation of the
verified bytes; the seal then fingerprints the planes (what is resident).

    Q8_0 {f16 d; i8 qs[32]}                     -> [qs: N*K] [d: N*K/32 f16]
    Q6_K {u8 ql[128]; u8 qh[64]; i8 sc[16]; f16 d} -> [ql: N*K/2] [qh: N*K/4] [sc: N*K/16] [d: N*K/256 f16]
    Q4_0 {f16 d; u8 qs[16]}                     -> [qs: N*K/2] [d: N*K/32 f16]
    Q4_1 {f16 d; f16 m; u8 qs[16]}              -> [qs: N*K/2] [d: N*K/32 f16] [m: N*K/32 f16]
    Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}           -> [qs: N*K/2] [qh: N*K/32 u32] [d: N*K/32 f16]
    Q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}    -> [qs: N*K/2] [qh: N*K/32 u32] [d: N*K/32 f16] [m: N*K/32 f16]

Row n of a plane starts at n * (its bytes per row), so a row's fields are contiguous.

Fragment order (``to_fragments``, Q4_K weights with N % 64 == 0 under ``quantized-half2``): each 64-row
group's quant bytes are interleaved so that one thread of the fused kernel reads its share of a wgmma
operand with one 16-byte load; the heads (d, dmin, 12 scale bytes) follow in row order. Same bytes,
same size; ``kernels/fragments.py`` says why and gives the byte map.
"""

from __future__ import annotations

import torch

from ..gguf.constants import BLOCK_LAYOUT, GGMLType

# (field widths in bytes, in block order) and the plane order they are stored in
_FIELDS: dict[GGMLType, tuple[tuple[int, ...], tuple[int, ...]]] = {
    GGMLType.Q8_0: ((2, 32), (1, 0)),  # block: d, qs -> planes: qs, d
    GGMLType.Q6_K: ((128, 64, 16, 2), (0, 1, 2, 3)),  # block: ql, qh, sc, d -> same order
    GGMLType.Q4_0: ((2, 16), (1, 0)),  # block: d, qs -> planes: qs, d
    GGMLType.Q4_1: ((2, 2, 16), (2, 0, 1)),  # block: d, m, qs -> planes: qs, d, m
    GGMLType.Q5_0: ((2, 4, 16), (2, 1, 0)),  # block: d, qh, qs -> planes: qs, qh, d
    GGMLType.Q5_1: ((2, 2, 4, 16), (3, 2, 0, 1)),  # block: d, m, qh, qs -> planes: qs, qh, d, m
}
PLANAR_TYPES = frozenset(_FIELDS)


def _offsets(widths: tuple[int, ...]) -> list[int]:
    out, at = [], 0
    for w in widths:
        out.append(at)
        at += w
    return out


def _check(raw: torch.Tensor, t: GGMLType, n: int, k: int) -> int:
    if t not in _FIELDS:
        raise ValueError(f"{t.name} has no planar layout")
    layout = BLOCK_LAYOUT[t]
    if k % layout.block_size or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValueError(f"{t.name} [{n}, {k}]: need uint8 bytes and K a multiple of {layout.block_size}")
    nb = n * k // layout.block_size
    if raw.numel() != nb * layout.type_size:
        raise ValueError(f"{t.name} [{n}, {k}]: expected {nb * layout.type_size} bytes, got {raw.numel()}")
    return nb


def to_planes(raw: torch.Tensor, t: GGMLType, n: int, k: int) -> torch.Tensor:
    """GGUF blocks of W[n, k] -> the planar bytes (a new tensor of the same size, raw's device)."""
    nb = _check(raw, t, n, k)
    widths, order = _FIELDS[t]
    offs = _offsets(widths)
    blocks = raw.view(nb, BLOCK_LAYOUT[t].type_size)
    return torch.cat([blocks[:, offs[f] : offs[f] + widths[f]].reshape(-1) for f in order])


def _planes(raw: torch.Tensor, t: GGMLType, nb: int) -> dict[int, torch.Tensor]:
    """Field index -> that field's plane as [nb, width]."""
    widths, order = _FIELDS[t]
    out, at = {}, 0
    for f in order:
        size = nb * widths[f]
        out[f] = raw[at : at + size].view(nb, widths[f])
        at += size
    return out


def from_planes(raw: torch.Tensor, t: GGMLType, n: int, k: int) -> torch.Tensor:
    """The planar bytes of W[n, k] -> its GGUF blocks (``to_planes``' exact inverse)."""
    nb = _check(raw, t, n, k)
    p = _planes(raw, t, nb)
    return torch.cat([p[f] for f in range(len(p))], dim=1).reshape(-1)


def plane_rows(raw: torch.Tensor, t: GGMLType, n: int, k: int, idx: torch.Tensor) -> torch.Tensor:
    """GGUF blocks of rows ``idx`` of a planar W[n, k] (an embedding lookup reads a few rows)."""
    nb = _check(raw, t, n, k)
    per_row = nb // n
    p = _planes(raw, t, nb)
    idx = idx.reshape(-1)
    fields = [p[f].view(n, per_row, -1).index_select(0, idx) for f in range(len(p))]
    return torch.cat(fields, dim=2).reshape(-1)


def repack_planar(raw: torch.Tensor, t: GGMLType, n: int, k: int) -> None:
    """In place: ``raw`` (a slot of the arena holding GGUF blocks) becomes its planar bytes."""
    raw.copy_(to_planes(raw, t, n, k))


def repack_fragments(raw: torch.Tensor, t: GGMLType, n: int, k: int) -> None:
    """In place: ``raw`` (a slot of the arena holding Q4_K, Q6_K or Q8_0 blocks) becomes its fragment-order bytes."""
    pack = {GGMLType.Q4_K: to_fragments, GGMLType.Q6_K: q6k_to_fragments, GGMLType.Q8_0: q8_to_fragments}[t]
    raw.copy_(pack(raw, n, k))


# --- Q4_K in fragment order ---------------------------------------------------------------------

FRAGMENT_ROWS = 64  # rows per group: one wgmma A operand (4 warps x 16)
_Q4K_BYTES = 144


def fragments_fit(n: int, k: int) -> bool:
    """Whether an [n, k] Q4_K or Q6_K weight can be stored in fragment order (Q8_0: ``q8_fragments_fit``)."""
    return n % FRAGMENT_ROWS == 0 and k % 256 == 0 and n > 0


def _tile_view(q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The quant bytes of blocks ``q`` [n, k/256, 128] as [G, w, x, g, sb, c, b3, b2, t, y]."""
    return q.reshape(n // FRAGMENT_ROWS, 4, 2, 8, k // 256, 4, 2, 2, 4, 2)


_TO_TILES = (0, 4, 5, 1, 3, 8, 6, 7, 9, 2)  # -> [G, sb, c, w, g, t, b3, b2, y, x]


def to_fragments(raw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """GGUF Q4_K blocks of W[n, k] -> the fragment-order bytes (a new tensor of the same size, raw's device)."""
    if not (fragments_fit(n, k) and raw.dtype == torch.uint8 and raw.dim() == 1 and raw.numel() == n * k // 256 * _Q4K_BYTES):
        raise ValueError(f"Q4_K [{n}, {k}] in fragment order needs N % {FRAGMENT_ROWS} == 0, K % 256 == 0 and its "
                         f"{n * k // 256 * _Q4K_BYTES} block bytes (uint8), got {raw.dtype} {tuple(raw.shape)}")
    b = raw.view(n, k // 256, _Q4K_BYTES)
    quants = _tile_view(b[:, :, 16:], n, k).permute(*_TO_TILES).reshape(-1)
    return torch.cat([quants, b[:, :, :16].reshape(-1)])


def _tiles(raw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The quant plane as [G, sb, c, w, g, t, b3, b2, y, x]."""
    return raw[: n * k // 2].view(n // FRAGMENT_ROWS, k // 256, 4, 4, 8, 4, 2, 2, 2, 2)


def from_fragments(raw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``to_fragments``' exact inverse: the GGUF blocks."""
    inv = sorted(range(10), key=lambda i: _TO_TILES[i])
    quants = _tiles(raw, n, k).permute(*inv).reshape(n, k // 256, 128)
    heads = raw[n * k // 2 :].view(n, k // 256, 16)
    return torch.cat([heads, quants], dim=2).reshape(-1)


def fragment_rows(raw: torch.Tensor, n: int, k: int, idx: torch.Tensor) -> torch.Tensor:
    """GGUF blocks of rows ``idx`` (an embedding lookup reads a few rows)."""
    idx = idx.reshape(-1)
    grp, r = idx // FRAGMENT_ROWS, idx % FRAGMENT_ROWS
    w, x, g = r // 16, (r // 8) % 2, r % 8
    sel = _tiles(raw, n, k)[grp, :, :, w, g, :, :, :, :, x]  # [len, sb, c, t, b3, b2, y]
    quants = sel.permute(0, 1, 2, 4, 5, 3, 6).reshape(-1, k // 256, 128)
    heads = raw[n * k // 2 :].view(n, k // 256, 16).index_select(0, idx)
    return torch.cat([heads, quants], dim=2).reshape(-1)


# --- Q6_K in fragment order ---------------------------------------------------------------------
# [tiles: per 64-row group G and 128-input pair P, 3 x 2048 bytes] [scales: N*K/16 i8, row-major] [d: N*K/256 f16]
# Tile bytes at (w, g, t, b3, b2, y, x) (row 16w + 8x + g, kl = 16*b3 + 8*b2 + 2*t + y, as Q4_K's): tile c (0, 1)
# holds the low 4 bits of q at inputs 128P + 64c + kl (low nibble) and + 32 (high nibble); the third tile the
# high 2 bits of those four values: bits 0-1 / 2-3 for tile 0's low / high nibble, 4-5 / 6-7 for tile 1's.
_Q6K_BYTES = 210


def _q6k_values(raw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The 6-bit quants (0..63, q + 32 of ggml's signed values) of Q6_K blocks as uint8 [n, k]."""
    b = raw.view(-1, _Q6K_BYTES)
    ql = b[:, :128].view(-1, 2, 2, 32)  # [block, half, l // 32, l % 32]
    qh = b[:, 128:192].view(-1, 2, 1, 32)
    lo = torch.cat([ql & 15, ql >> 4], dim=2)  # [block, half, 4, 32]: inputs +0, +32, +64, +96
    hi = torch.cat([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], dim=2)
    return (lo | (hi << 4)).reshape(n, k)


def _q6k_blocks(q: torch.Tensor, scales: torch.Tensor, d: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``_q6k_values``' inverse: quants [rows, k] + scales [rows, k/16] + d [rows, k/256] (bytes) -> the blocks."""
    v = q.reshape(-1, 2, 4, 32)
    ql = (v[:, :, 0:2] & 15) | ((v[:, :, 2:4] & 15) << 4)  # [block, half, 2, 32]
    h = v >> 4
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), scales.reshape(-1, 16), d.reshape(-1, 2)], dim=1).reshape(-1)


def _q6k_tile_view(q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Quants [n, k] as [G, w, x, g, P, c, h, b3, b2, t, y] (input 128P + 64c + 32h + kl)."""
    return q.reshape(n // FRAGMENT_ROWS, 4, 2, 8, k // 128, 2, 2, 2, 2, 4, 2)


_Q6K_TO_TILES = _TO_TILES  # the nibble bytes [G, w, x, g, P, c, b3, b2, t, y] -> [G, P, c, w, g, t, b3, b2, y, x]


def q6k_to_fragments(raw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """GGUF Q6_K blocks of W[n, k] -> the fragment-order bytes (same size, raw's device)."""
    if not (fragments_fit(n, k) and raw.dtype == torch.uint8 and raw.dim() == 1 and raw.numel() == n * k // 256 * _Q6K_BYTES):
        raise ValueError(f"Q6_K [{n}, {k}] in fragment order needs N % {FRAGMENT_ROWS} == 0, K % 256 == 0 and its "
                         f"{n * k // 256 * _Q6K_BYTES} block bytes (uint8), got {raw.dtype} {tuple(raw.shape)}")
    q = _q6k_tile_view(_q6k_values(raw, n, k), n, k)  # [G, w, x, g, P, c, h, b3, b2, t, y]
    nib = (q[:, :, :, :, :, :, 0] & 15) | ((q[:, :, :, :, :, :, 1] & 15) << 4)  # [G, w, x, g, P, c, b3, b2, t, y]
    h = q >> 4
    high = (h[:, :, :, :, :, 0, 0] | (h[:, :, :, :, :, 0, 1] << 2) | (h[:, :, :, :, :, 1, 0] << 4)
            | (h[:, :, :, :, :, 1, 1] << 6))  # [G, w, x, g, P, b3, b2, t, y]
    nib = nib.permute(*_Q6K_TO_TILES)  # [G, P, c, w, g, t, b3, b2, y, x]
    high = high.permute(0, 4, 1, 3, 7, 5, 6, 8, 2).unsqueeze(2)  # [G, P, 1, w, g, t, b3, b2, y, x]
    tiles = torch.cat([nib, high], dim=2).reshape(-1)
    b = raw.view(n, k // 256, _Q6K_BYTES)
    return torch.cat([tiles, b[:, :, 192:208].reshape(-1), b[:, :, 208:210].reshape(-1)])


def q6k_from_fragments(raw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``q6k_to_fragments``' exact inverse: the GGUF blocks."""
    nt = n * k * 3 // 4
    tiles = raw[:nt].view(n // FRAGMENT_ROWS, k // 128, 3, 4, 8, 4, 2, 2, 2, 2)  # [G, P, tile, w, g, t, b3, b2, y, x]
    nib, high = tiles[:, :, :2], tiles[:, :, 2:]
    parts = [nib & 15, nib >> 4]  # h = 0, 1: [G, P, c, ...]
    hb = [((high >> (2 * (2 * c + h))) & 3) for c in range(2) for h in range(2)]  # (c, h) order
    q = torch.stack([torch.cat([parts[h][:, :, c : c + 1] | (hb[2 * c + h] << 4) for c in range(2)], dim=2)
                     for h in range(2)], dim=3)  # [G, P, c, h, w, g, t, b3, b2, y, x]
    q = q.permute(0, 4, 10, 5, 1, 2, 3, 7, 8, 6, 9).reshape(n, k)  # -> [G, w, x, g, P, c, h, b3, b2, t, y]
    sc = raw[nt : nt + n * k // 16].view(n, k // 256, 16)
    d = raw[nt + n * k // 16 :].view(n, k // 256, 2)
    return _q6k_blocks(q, sc, d, n, k)


def q6k_fragment_rows(raw: torch.Tensor, n: int, k: int, idx: torch.Tensor) -> torch.Tensor:
    """GGUF blocks of rows ``idx`` (an embedding lookup): the rows' bytes gathered from the tiles."""
    idx = idx.reshape(-1)
    nt = n * k * 3 // 4
    tiles = raw[:nt].view(n // FRAGMENT_ROWS, k // 128, 3, 4, 8, 4, 2, 2, 2, 2)  # [G, P, tile, w, g, t, b3, b2, y, x]
    grp, r = idx // FRAGMENT_ROWS, idx % FRAGMENT_ROWS
    sel = tiles[grp, :, :, r // 16, r % 8, :, :, :, :, (r // 8) % 2]  # [len, P, tile, t, b3, b2, y]
    high = sel[:, :, 2]
    q = torch.stack([torch.stack([((sel[:, :, c] >> (4 * h)) & 15) | (((high >> (2 * (2 * c + h))) & 3) << 4)
                                  for h in range(2)], dim=2) for c in range(2)], dim=2)  # [len, P, c, h, t, b3, b2, y]
    q = q.permute(0, 1, 2, 3, 5, 6, 4, 7).reshape(-1, k)  # -> [len, P, c, h, b3, b2, t, y]
    sc = raw[nt : nt + n * k // 16].view(n, k // 256, 16).index_select(0, idx)
    d = raw[nt + n * k // 16 :].view(n, k // 256, 2).index_select(0, idx)
    return _q6k_blocks(q, sc, d, idx.numel(), k)


# --- Q8_0 in fragment order ---------------------------------------------------------------------
# [tiles: per 64-row group G and 32-input block b, 2048 bytes] [d: N*K/32 f16, row-major]. Tile byte at
# (w, g, t, b3, b2, x, y) is q of row 16w + 8x + g, input 32b + 16*b3 + 8*b2 + 2*t + y: the file's bytes, moved.
_Q8_BYTES = 34


def q8_fragments_fit(n: int, k: int) -> bool:
    return n % FRAGMENT_ROWS == 0 and k % 32 == 0 and n > 0


def q8_to_fragments(raw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """GGUF Q8_0 blocks of W[n, k] -> the fragment-order bytes (same size, raw's device)."""
    if not (q8_fragments_fit(n, k) and raw.dtype == torch.uint8 and raw.dim() == 1 and raw.numel() == n * k // 32 * _Q8_BYTES):
        raise ValueError(f"Q8_0 [{n}, {k}] in fragment order needs N % {FRAGMENT_ROWS} == 0, K % 32 == 0 and its "
                         f"{n * k // 32 * _Q8_BYTES} block bytes (uint8), got {raw.dtype} {tuple(raw.shape)}")
    b = raw.view(n, k // 32, _Q8_BYTES)
    q = b[:, :, 2:].reshape(n // FRAGMENT_ROWS, 4, 2, 8, k // 32, 2, 2, 4, 2)  # [G, w, x, g, blk, b3, b2, t, y]
    tiles = q.permute(0, 4, 1, 3, 7, 5, 6, 2, 8).reshape(-1)  # [G, blk, w, g, t, b3, b2, x, y]
    return torch.cat([tiles, b[:, :, :2].reshape(-1)])


def q8_from_fragments(raw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``q8_to_fragments``' exact inverse: the GGUF blocks."""
    tiles = raw[: n * k].view(n // FRAGMENT_ROWS, k // 32, 4, 8, 4, 2, 2, 2, 2)  # [G, blk, w, g, t, b3, b2, x, y]
    q = tiles.permute(0, 2, 7, 3, 1, 5, 6, 4, 8).reshape(n, k // 32, 32)
    d = raw[n * k :].view(n, k // 32, 2)
    return torch.cat([d, q], dim=2).reshape(-1)


def q8_fragment_rows(raw: torch.Tensor, n: int, k: int, idx: torch.Tensor) -> torch.Tensor:
    """GGUF blocks of rows ``idx`` (an embedding lookup): the rows' bytes gathered from the tiles."""
    idx = idx.reshape(-1)
    tiles = raw[: n * k].view(n // FRAGMENT_ROWS, k // 32, 4, 8, 4, 2, 2, 2, 2)  # [G, blk, w, g, t, b3, b2, x, y]
    grp, r = idx // FRAGMENT_ROWS, idx % FRAGMENT_ROWS
    sel = tiles[grp, :, r // 16, r % 8, :, :, :, (r // 8) % 2, :]  # [len, blk, t, b3, b2, y]
    q = sel.permute(0, 1, 3, 4, 2, 5).reshape(-1, k // 32, 32)
    d = raw[n * k :].view(n, k // 32, 2).index_select(0, idx)
    return torch.cat([d, q], dim=2).reshape(-1)
