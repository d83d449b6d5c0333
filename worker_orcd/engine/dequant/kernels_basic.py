"""Triton kernels for plain floats and the 32-element block formats (Q8_0, Q4_0/1, Q5_0/1).

One program dequantizes NB consecutive blocks as an [NB, 32] tile: element j
of a block gathers the byte(s) it needs from the raw stream, so neighbouring
lanes read neighbouring bytes (coalesced) and no byte alignment is assumed.
Block and element indices are int64 so tensors past 2**31 bytes are safe.
Math is float32 in ggml's order; launch with ``enable_fp_fusion=False`` so
``d * q + m`` is not contracted into an FMA (that would change the last bit).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_f16(ptr, offs, mask):
    """Two little-endian bytes at ``offs`` -> float32 (exact), no alignment needed."""
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _round_bf16(x):
    """float32 -> bfloat16, round-to-nearest-even done on the bits.

    Backends disagree here (the interpreter truncates), so the rounding is
    spelled out: it is then identical everywhere and equal to torch's cast.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN -> torch's canonical quiet NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_out(out_ptr, offs, x, mask):
    """Round float32 ``x`` once to the output dtype and store it."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptr + offs, _round_bf16(x), mask=mask)
    else:
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def convert_kernel(src_ptr, out_ptr, n_elements, BLOCK: tl.constexpr, SRC_BF16: tl.constexpr):
    """F32/F16/BF16 -> out dtype; ``src_ptr`` is already typed (the wrapper aligns it).

    BF16 arrives as int16 and is widened on the bits (x << 16): exact for
    every value, subnormals included, on every backend.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    if SRC_BF16:
        bits = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int32)
        x = (bits << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.float32)
    store_out(out_ptr, offs, x, mask)


@triton.jit
def _tile(n_blocks, NB: tl.constexpr):
    """Block indices of this program as [NB, 1], element index j as [1, 32], row mask."""
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    return blk[:, None], tl.arange(0, 32)[None, :], (blk < n_blocks)[:, None]


@triton.jit
def q8_0_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q8_0 {f16 d; i8 qs[32]}: x = q * d."""
    blk, j, mask = _tile(n_blocks, NB)
    base = blk * 34
    d = load_f16(raw_ptr, base, mask)
    q = tl.load(raw_ptr + base + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True)
    x = q.to(tl.float32) * d
    store_out(out_ptr, blk * 32 + j, x, mask)


@triton.jit
def _nibble(raw_ptr, qs_offs, j, mask):
    """4-bit value of element j: low nibbles of qs[0:16] are 0..15, high nibbles 16..31."""
    byte = tl.load(raw_ptr + qs_offs + (j % 16), mask=mask, other=0).to(tl.int32)
    return (byte >> ((j // 16) * 4)) & 0x0F


@triton.jit
def _fifth_bit(raw_ptr, qh_offs, j, mask):
    """Bit j of the little-endian u32 qh, placed at bit 4."""
    byte = tl.load(raw_ptr + qh_offs + (j // 8), mask=mask, other=0).to(tl.int32)
    return ((byte >> (j % 8)) & 1) << 4


@triton.jit
def q4_0_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q4_0 {f16 d; u8 qs[16]}: x = (q - 8) * d."""
    blk, j, mask = _tile(n_blocks, NB)
    base = blk * 18
    d = load_f16(raw_ptr, base, mask)
    q = _nibble(raw_ptr, base + 2, j, mask) - 8
    x = d * q.to(tl.float32)
    store_out(out_ptr, blk * 32 + j, x, mask)


@triton.jit
def q4_1_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q4_1 {f16 d; f16 m; u8 qs[16]}: x = q * d + m."""
    blk, j, mask = _tile(n_blocks, NB)
    base = blk * 20
    d = load_f16(raw_ptr, base, mask)
    m = load_f16(raw_ptr, base + 2, mask)
    q = _nibble(raw_ptr, base + 4, j, mask)
    x = d * q.to(tl.float32) + m
    store_out(out_ptr, blk * 32 + j, x, mask)


@triton.jit
def q5_0_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: x = (q - 16) * d, bit 4 of q from qh."""
    blk, j, mask = _tile(n_blocks, NB)
    base = blk * 22
    d = load_f16(raw_ptr, base, mask)
    q = (_nibble(raw_ptr, base + 6, j, mask) | _fifth_bit(raw_ptr, base + 2, j, mask)) - 16
    x = d * q.to(tl.float32)
    store_out(out_ptr, blk * 32 + j, x, mask)


@triton.jit
def q5_1_kernel(raw_ptr, out_ptr, n_blocks, NB: tl.constexpr):
    """Q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: x = q * d + m."""
    blk, j, mask = _tile(n_blocks, NB)
    base = blk * 24
    d = load_f16(raw_ptr, base, mask)
    m = load_f16(raw_ptr, base + 2, mask)
    q = _nibble(raw_ptr, base + 8, j, mask) | _fifth_bit(raw_ptr, base + 4, j, mask)
    x = d * q.to(tl.float32) + m
    store_out(out_ptr, blk * 32 + j, x, mask)
