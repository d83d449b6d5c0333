"""Triton kernels for the 256-element K-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).

One program dequantizes NB super-blocks as a 3-D tile [NB, groups, lanes]
where a group shares one scale: per-group fields (six-bit scales and mins,
int8 scales) are loaded once as [NB, groups, 1] and broadcast, quant bytes are
gathered per element. Same conventions as ``kernels_basic``: int64 indices,
float32 math in ggml's order, launched with ``enable_fp_fusion=False``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_basic import load_f16, store_out


@triton.jit
def _tile3(n_blocks, NB: tl.constexpr, GROUPS: tl.constexpr, LANES: tl.constexpr):
    """Super-block index [NB,1,1], group [1,G,1], lane [1,1,L] and the row mask."""
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    blk = blk[:, None, None]
    g = tl.arange(0, GROUPS)[None, :, None]
    lane = tl.arange(0, LANES)[None, None, :]
    return blk, g, lane, blk < n_blocks


@triton.jit
def _scale_min_k4(raw_ptr, sc_offs, s, mask):
    """Six-bit scale and min of sub-block s (0..7) from the 12 packed bytes (get_scale_min_k4)."""
    lo = s % 4
    a = tl.load(raw_ptr + sc_offs + lo, mask=mask, other=0).to(tl.int32)  # scales[0:4]
    b = tl.load(raw_ptr + sc_offs + 4 + lo, mask=mask, other=0).to(tl.int32)  # scales[4:8]
    c = tl.load(raw_ptr + sc_offs + 8 + lo, mask=mask, other=0).to(tl.int32)  # scales[8:12]
    sc = tl.where(s < 4, a & 63, (c & 0x0F) | ((a >> 2) & 0x30))
    mn = tl.where(s < 4, b & 63, (c >> 4) | ((b >> 2) & 0x30))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _k_low_nibble(raw_ptr, qs_offs, s, lane, mask):
    """4-bit value of sub-block s, lane l: qs[32*(s//2) + l], low nibble for even s."""
    byte = tl.load(raw_ptr + qs_offs + (s // 2) * 32 + lane, mask=mask, other=0).to(tl.int32)
    return (byte >> ((s % 2) * 4)) & 0x0F


@triton.jit
def q4_k_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}: x = (d*sc)*q - dmin*m."""
    blk, s, lane, mask = _tile3(n_blocks, NB, 8, 32)
    base = blk * 144
    d = load_f16(raw_ptr, base, mask)
    dmin = load_f16(raw_ptr, base + 2, mask)
    sc, mn = _scale_min_k4(raw_ptr, base + 4, s, mask)
    q = _k_low_nibble(raw_ptr, base + 16, s, lane, mask).to(tl.float32)
    x = (d * sc) * q - dmin * mn
    store_out(out_ptr, blk * 256 + s * 32 + lane, x, mask)


@triton.jit
def q5_k_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: bit 4 of q is bit s of qh[l]."""
    blk, s, lane, mask = _tile3(n_blocks, NB, 8, 32)
    base = blk * 176
    d = load_f16(raw_ptr, base, mask)
    dmin = load_f16(raw_ptr, base + 2, mask)
    sc, mn = _scale_min_k4(raw_ptr, base + 4, s, mask)
    qh = tl.load(raw_ptr + base + 16 + lane, mask=mask, other=0).to(tl.int32)
    q = _k_low_nibble(raw_ptr, base + 48, s, lane, mask) | (((qh >> s) & 1) << 4)
    x = (d * sc) * q.to(tl.float32) - dmin * mn
    store_out(out_ptr, blk * 256 + s * 32 + lane, x, mask)


@triton.jit
def q6_k_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: x = (d*scale[j//16]) * (q - 32).

    Element j (0..255) lives in half h = j // 128; within it, ql[64h + j%64]
    holds the low nibble (high nibble for (j//64) odd) and qh[128 + 32h + j%32]
    holds two more bits at shift 2*((j//32) % 4).
    """
    blk, g, t, mask = _tile3(n_blocks, NB, 16, 16)
    base = blk * 210
    j = g * 16 + t
    half = j // 128
    ql = tl.load(raw_ptr + base + half * 64 + (j % 64), mask=mask, other=0).to(tl.int32)
    qh = tl.load(raw_ptr + base + 128 + half * 32 + (j % 32), mask=mask, other=0).to(tl.int32)
    low = (ql >> (((j // 64) % 2) * 4)) & 0x0F
    high = (qh >> (((j // 32) % 4) * 2)) & 0x03
    q = ((low | (high << 4)) - 32).to(tl.float32)
    scale = tl.load(raw_ptr + base + 192 + g, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    d = load_f16(raw_ptr, base + 208, mask)
    x = (d * scale) * q
    store_out(out_ptr, blk * 256 + j, x, mask)


@triton.jit
def _q2_lane_bits(raw_ptr, qs_offs, j, mask):
    """2-bit field of element j (0..255) in the 64 bytes at ``qs_offs`` (Q2_K and Q3_K share it):
    byte qs[32*(j//128) + j%32], shift 2*((j%128)//32) (ggml's n/shift/l loops)."""
    byte = tl.load(raw_ptr + qs_offs + (j // 128) * 32 + (j % 32), mask=mask, other=0).to(tl.int32)
    return (byte >> (((j % 128) // 32) * 2)) & 3


@triton.jit
def q2_k_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q2_K {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}: x = (d*(sc&15)) * q - dmin*(sc>>4), sc = scales[j//16]."""
    blk, g, t, mask = _tile3(n_blocks, NB, 16, 16)
    base = blk * 84
    j = g * 16 + t
    sc = tl.load(raw_ptr + base + g, mask=mask, other=0).to(tl.int32)
    q = _q2_lane_bits(raw_ptr, base + 16, j, mask).to(tl.float32)
    d = load_f16(raw_ptr, base + 80, mask)
    dmin = load_f16(raw_ptr, base + 82, mask)
    x = (d * (sc & 0x0F).to(tl.float32)) * q - dmin * (sc >> 4).to(tl.float32)
    store_out(out_ptr, blk * 256 + j, x, mask)


@triton.jit
def q3_k_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: x = (d*(s-32)) * (q - (h ? 0 : 4)).

    Six-bit scale s of group g: low nibble of scales[g%8] (high nibble for g >= 8),
    bits 4-5 from scales[8 + g%4] at shift 2*(g//4). h is bit j//32 of hmask[j%32].
    """
    blk, g, t, mask = _tile3(n_blocks, NB, 16, 16)
    base = blk * 110
    j = g * 16 + t
    lo = tl.load(raw_ptr + base + 96 + (g % 8), mask=mask, other=0).to(tl.int32)
    hi = tl.load(raw_ptr + base + 104 + (g % 4), mask=mask, other=0).to(tl.int32)
    s = (((lo >> ((g // 8) * 4)) & 0x0F) | (((hi >> ((g // 4) * 2)) & 3) << 4)) - 32
    hm = tl.load(raw_ptr + base + (j % 32), mask=mask, other=0).to(tl.int32)
    h = (hm >> (j // 32)) & 1
    q = _q2_lane_bits(raw_ptr, base + 32, j, mask) - ((h ^ 1) << 2)
    d = load_f16(raw_ptr, base + 108, mask)
    x = (d * s.to(tl.float32)) * q.to(tl.float32)
    store_out(out_ptr, blk * 256 + j, x, mask)
