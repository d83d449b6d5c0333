"""y = x · Wᵀ for Q4_K, Q5_K, Q6_K and Q8_0 weights at memory speed: the dense kernel's dot chain over
weight sub-tiles dequantized in registers.

Why beside ``qmatmul``: that kernel dequantizes a [BN, 256] tile element by element, each
element computing its own byte addresses (a load per element and per scale): 58-172 GB/s on
the H200. Here a program reads one unit of K per step (Q8_0: 32 inputs, Q4_K: 64 of a
super-block, Q6_K: 128, Q4_0/Q4_1/Q5_0/Q5_1: 32) with one aligned vector load per field — Q4_K and Q5_K blocks (144 and 176
bytes) are 16-byte aligned in the file, the others are made so by ``qlayout``'s planes —, the scales
once per column and super-block, and turns it into 32-input sub-tiles. Integers become
floats by the exponent trick (``(q | 0x4B000000)`` as fp32 minus 2^23: exact, full rate).

Two forms of the same sums:

* swapped (M <= SWAP_MAX_M, decode): yᵀ = W · xᵀ — the dequantized weight is the tensor core's
  A operand (64 weight rows per wgmma, straight from registers), the tokens its N (16 or 32);
  Hopper's wgmma reads B only from shared memory, so in the other form every dequantized element
  makes a shared-memory trip. One program per (64 weight rows, token tile, K segment);
* unswapped (larger M, prefill): ``tl.dot(x[rows, 32], Wᵀ[32, BN], acc)`` as 64/128-row wgmma
  tiles (``launch_config``), all K segments in one program.

Arithmetic (batch invariance):

* each 32-input sub-tile is dequantized exactly as ggml does (fp32, no FMA contraction:
  ``enable_fp_fusion=False``) and rounded once to the activation dtype — the fp16/bf16 values
  the dense residency holds;
* K is cut into segments fixed per weight shape (``k_segments``, never per M); each segment's
  chain is k16 tensor-core steps in k order from zero in fp32, and the chains are added in
  segment order (the swapped form writes them out and ``_segments_sum_kernel`` adds them; the
  unswapped one adds them as it goes), then the bias, one rounding. A row's chain is the same
  products in the same order in either form, and the dense kernel's: measured bitwise on the
  H200 (``tests/test_qmatmul.py``: every M against ``segments_reference``, built from the dense
  kernel; ``benchmarks/probe_swap_q4k.py``). Where a shape has one segment a row equals the
  dense residency's bit for bit; with several (narrow deep matrices) it differs from it by the
  fp32 regrouping only. The 16-row ``mma.sync`` form of the unswapped kernel did NOT give the
  dense kernel's bits (RESULTS.md) and is used only by the CPU interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...gguf.constants import GGMLType
from ..dequant.kernels_basic import _round_bf16
from ..qlayout import PLANAR_TYPES, to_planes
from ..qweight import QWeight
from . import pdl
from . import validate as v
from .qmatmul import _dot, _store_rows

KERNEL = "qmatmul_tiled"
SUB = 32  # inputs per dot (one Q8_0 block, one K-quant sub-block)
TILED_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K,
                         GGMLType.Q6_K, GGMLType.Q8_0})
_BLOCKS_32 = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1})  # 32-input dots only
_NEEDS_PLANES = PLANAR_TYPES
WIDE_MIN_M = 64
SWAP_MAX_M = 64  # rows up to which the swapped form (weight as the A operand) runs
SWAP_BN = 64  # weight rows per program in the swapped form (one wgmma's 64 rows)
SEG_UNIT = 256  # K segment boundaries: multiples of a K-quant super-block (8 Q8_0 blocks)
MAX_SEGMENTS = 8
TARGET_PROGRAMS = 1024  # segments are added until the swapped form has this many programs (or MAX_SEGMENTS)
SUM_BLOCK = 1024
HALF2_TYPES = frozenset({GGMLType.Q4_K, GGMLType.Q6_K})  # ``half2`` dequantization (QWeight.half2)


def supports(w: QWeight) -> bool:
    """Whether ``w`` runs here: Q4_K/Q5_K as the file's blocks, the other types repacked into planes."""
    return w.ggml_type in TILED_TYPES and (w.planar or w.fragments or w.ggml_type not in _NEEDS_PLANES)


def launch_config(m: int, n: int, k: int, t: GGMLType) -> tuple[int, int, int, int, int]:
    """(rows per dot, GROUP_M, BN, num_warps, num_stages); none of them changes a row's sums.

    Every M runs 64- or 128-row wgmma tiles: on the H200 the 16-row mma.sync form of this kernel
    did NOT give the dense kernel's bits at M <= 16 while the wgmma form did at every M
    (benchmarks/tune_qtiled.py, RESULTS.md), and at decode the idle rows cost nothing that
    matters (the step is bound by the weight bytes and their dequantization, not the dot).
    Below 64 rows: the fastest bit-identical candidates of the M = 1 sweep on the 7B/0.5B shapes."""
    if m >= 128 and -(-m // 128) * -(-n // 128) >= 100:
        # a Q4_K/Q6_K step holds 8 x sub-tiles: 128x128 tiles fit the 227 KB of shared memory in 2 stages
        return 128, 1, 128, 8, 2
    if m >= WIDE_MIN_M:
        return 64, 1, 64, 4, 2
    if n <= 4096:  # narrow: more, thinner programs (7B down: 224 of them)
        return 64, 1, 16 if k >= 8192 else 32, 4, 3
    if t == GGMLType.Q8_0:
        return 64, 1, 64, 4, 3
    return (64, 1, 128, 4, 2) if n <= 65_536 else (64, 1, 32, 4, 2)


@triton.jit
def _u2f(q, bias: tl.constexpr):
    """int32 q (0 <= q < 2^23) -> float32(q) - (bias - 2^23), exact: q's bits in the mantissa of 2^23."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - bias


@triton.jit
def _act(w, x_ptr):
    """A dequantized fp32 sub-tile rounded once to the activation dtype, transposed for the dot."""
    if x_ptr.dtype.element_ty == tl.bfloat16:
        return tl.trans(_round_bf16(w))
    return tl.trans(w.to(x_ptr.dtype.element_ty))


@triton.jit
def _dots(x_ptr, rows0, k0, wt, a0, a1, a2, a3, M, stride_xm,
          GROUP: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr, KD: tl.constexpr = 32):
    """acc_g = dot(x[rows0 + g*BR + (0..BR), k0 : k0+KD], wt, acc_g) for each of GROUP row blocks."""
    kk = k0 + tl.arange(0, KD)
    r = rows0 + tl.arange(0, BR).to(tl.int64)
    xp = x_ptr + r[:, None] * stride_xm + kk[None, :]
    a0 = _dot(tl.load(xp, mask=r[:, None] < M, other=0.0), wt, a0, IEEE)
    if GROUP > 1:
        a1 = _dot(tl.load(xp + BR * stride_xm, mask=(r + BR)[:, None] < M, other=0.0), wt, a1, IEEE)
    if GROUP > 2:
        a2 = _dot(tl.load(xp + 2 * BR * stride_xm, mask=(r + 2 * BR)[:, None] < M, other=0.0), wt, a2, IEEE)
        a3 = _dot(tl.load(xp + 3 * BR * stride_xm, mask=(r + 3 * BR)[:, None] < M, other=0.0), wt, a3, IEEE)
    return a0, a1, a2, a3


@triton.jit
def _byte(word, i: tl.constexpr):
    """Signed byte i (0..3) of an int32 word, as int32."""
    return (word << (24 - 8 * i)) >> 24


@triton.jit
def _k_head(w16_ptr, w32_ptr, base, nm):
    """A Q4_K/Q5_K super-block's head: d, dmin (fp32) and the 12 scale bytes as three words."""
    d = tl.load(w16_ptr + base // 2, mask=nm, other=0.0).to(tl.float32)
    dmin = tl.load(w16_ptr + base // 2 + 1, mask=nm, other=0.0).to(tl.float32)
    w1 = tl.load(w32_ptr + base // 4 + 1, mask=nm, other=0)
    w2 = tl.load(w32_ptr + base // 4 + 2, mask=nm, other=0)
    w3 = tl.load(w32_ptr + base // 4 + 3, mask=nm, other=0)
    return d, dmin, w1, w2, w3


@triton.jit
def _k4_scale_min(w1, w2, w3, s: tl.constexpr):
    """get_scale_min_k4 for sub-block s from the 12 scale bytes as three words (q[0:4], q[4:8], q[8:12])."""
    a = (w1 >> (8 * (s % 4))) & 255
    b = (w2 >> (8 * (s % 4))) & 255
    if s < 4:
        sc = a & 63
        mn = b & 63
    else:
        c = (w3 >> (8 * (s % 4))) & 255
        sc = (c & 15) | ((a >> 2) & 0x30)
        mn = (c >> 4) | ((b >> 2) & 0x30)
    return _u2f(sc, 8388608.0), _u2f(mn, 8388608.0)


@triton.jit
def _cast(w, x_ptr):
    """A dequantized fp32 sub-tile rounded once to the activation dtype (the swapped form's A operand)."""
    if x_ptr.dtype.element_ty == tl.bfloat16:
        return _round_bf16(w)
    return w.to(x_ptr.dtype.element_ty)


@triton.jit
def _acc(w, x_ptr, rows0, k0, a0, a1, a2, a3, M, stride_xm,
         GROUP: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr, KD: tl.constexpr, SWAP: tl.constexpr):
    """Continue the k chain with one dequantized [BN, KD] sub-tile ``w`` (inputs k0 .. k0+KD).

    SWAP: acc[BN, BR] = dot(w, x[rows0 .. rows0+BR, k0 : k0+KD]ᵀ, acc) — the weight is the tensor
    core's A operand, taken from registers (Hopper's wgmma reads B only from shared memory);
    otherwise acc_g[BR, BN] = dot(x[...], wᵀ, acc_g) for GROUP row blocks. Each output element is
    the same chain of products in the same k order either way."""
    if SWAP:
        t = rows0 + tl.arange(0, BR).to(tl.int64)
        kk = k0 + tl.arange(0, KD)
        xt = tl.load(x_ptr + t[None, :] * stride_xm + kk[:, None], mask=t[None, :] < M, other=0.0)
        a0 = _dot(_cast(w, x_ptr), xt, a0, IEEE)
    else:
        a0, a1, a2, a3 = _dots(x_ptr, rows0, k0, _act(w, x_ptr), a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, KD)
    return a0, a1, a2, a3


@triton.jit
def _zero_acc(BR: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr):
    if SWAP:
        z = tl.zeros((BN, BR), dtype=tl.float32)
    else:
        z = tl.zeros((BR, BN), dtype=tl.float32)
    return z


# Q4_K in packed half2 (``half2=True``; the engine's ``quantized-half2`` residency: 1.13-1.27x the fp32
# arithmetic per 7B Q4_K matrix on the H200, a 7B Q4_K_M decode step 6.71 -> 5.92 ms, RESULTS ninth session):
# both nibbles of 2 bytes (a pair of the wgmma A fragment) become 4 fp16 values q*s - m with fp16
# s = fp16(d*sc), m = fp16(dmin*mn) and ONE rounding (fma.rn.f16x2): 8 instructions per 4 weights
# against ~12 per weight for ggml's fp32 arithmetic plus the conversion (SASS of the swapped 64x16
# form, Triton 3.9 for sm_90: 1,120 vs 1,608 instructions per super-block and thread; pack=4 needed
# 1,200, its byte gathering costing 80 PRMT). The values differ from ggml's by the rounding of s and m to fp16;
# ``q4k_half2_weight`` is the same arithmetic in torch (float64, rounded once), for references.
_Q4K_HALF2_ASM = tl.constexpr("""
{
.reg .b32 t, lo, hi, km, kh, ke, k16, kn64;
.reg .b16 zero;
mov.b16 zero, 0;
mov.b32 km, 0x000F000F;
mov.b32 kh, 0x00F000F0;
mov.b32 ke, 0x64006400;
mov.b32 k16, 0x2C002C00;
mov.b32 kn64, 0xD400D400;
mov.b32 t, {$2, zero};
prmt.b32 t, t, 0, 0x4140;
lop3.b32 lo, t, km, ke, 0xea;
lop3.b32 hi, t, kh, ke, 0xea;
sub.f16x2 lo, lo, ke;
fma.rn.f16x2 hi, hi, k16, kn64;
fma.rn.f16x2 $0, lo, $3, $4;
fma.rn.f16x2 $1, hi, $5, $6;
}
""")


@triton.jit
def _q4k_half2(qb, s0, m0, s1, m1, BN: tl.constexpr, INTERP: tl.constexpr):
    """(low nibbles, high nibbles) of Q4_K bytes ``qb`` [BN, 32] as fp16 q*s - m, s/m per row (fp32 in,
    rounded to fp16 first); one fp16 rounding. In the interpreter: float64, rounded once (the same values)."""
    s0h = tl.broadcast_to(s0.to(tl.float16), (BN, 32))
    s1h = tl.broadcast_to(s1.to(tl.float16), (BN, 32))
    n0h = tl.broadcast_to(-(m0.to(tl.float16)), (BN, 32))
    n1h = tl.broadcast_to(-(m1.to(tl.float16)), (BN, 32))
    if INTERP:
        lo = ((qb & 15).to(tl.float64) * s0h.to(tl.float64) + n0h.to(tl.float64)).to(tl.float16)
        hi = ((qb >> 4).to(tl.float64) * s1h.to(tl.float64) + n1h.to(tl.float64)).to(tl.float16)
    else:
        lo, hi = tl.inline_asm_elementwise(_Q4K_HALF2_ASM, "=r,=r,h,r,r,r,r", [qb, s0h, n0h, s1h, n1h],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    return lo, hi


# Q6_K in packed half2 (``half2=True``): y = fp16(d*sc) * (q - 32), q from 4 bits of ql and 2 of qh,
# one fp16 rounding (mul.rn.f16x2); one call turns a pair of positions l, l+1 into the four sub-tiles'
# values (t = 0..3: ql0/ql1 low nibbles with qh bits 0-1/2-3, high nibbles with bits 4-5/6-7).
_Q6K_HALF2_ASM = tl.constexpr("""
{
.reg .b32 a, b, h, q, x, m4, m2, ke, k1056;
.reg .b16 zero;
mov.b16 zero, 0;
mov.b32 m4, 0x000F000F;
mov.b32 m2, 0x00300030;
mov.b32 ke, 0x64006400;
mov.b32 k1056, 0x64206420;
mov.b32 a, {$4, zero};
prmt.b32 a, a, 0, 0x4140;
mov.b32 b, {$5, zero};
prmt.b32 b, b, 0, 0x4140;
mov.b32 h, {$6, zero};
prmt.b32 h, h, 0, 0x4140;
shl.b32 x, h, 4;
lop3.b32 q, x, m2, ke, 0xea;
lop3.b32 q, a, m4, q, 0xea;
sub.f16x2 q, q, k1056;
mul.rn.f16x2 $0, q, $7;
shl.b32 x, h, 2;
lop3.b32 q, x, m2, ke, 0xea;
lop3.b32 q, b, m4, q, 0xea;
sub.f16x2 q, q, k1056;
mul.rn.f16x2 $1, q, $8;
lop3.b32 q, h, m2, ke, 0xea;
shr.b32 x, a, 4;
lop3.b32 q, x, m4, q, 0xea;
sub.f16x2 q, q, k1056;
mul.rn.f16x2 $2, q, $9;
shr.b32 x, h, 2;
lop3.b32 q, x, m2, ke, 0xea;
shr.b32 x, b, 4;
lop3.b32 q, x, m4, q, 0xea;
sub.f16x2 q, q, k1056;
mul.rn.f16x2 $3, q, $10;
}
""")


@triton.jit
def _q6k_half2(ql0, ql1, qh, s0, s1, s2, s3, INTERP: tl.constexpr):
    """The four [BN, 32] sub-tiles of a Q6_K half super-block (ql0/ql1/qh bytes, fp16 scales per
    element) as fp16 s * (q - 32), one rounding. In the interpreter: float64, rounded once (the same)."""
    if INTERP:
        y0 = (((ql0 & 15) | ((qh & 3) << 4)).to(tl.float64) - 32.0) * s0.to(tl.float64)
        y1 = (((ql1 & 15) | (((qh >> 2) & 3) << 4)).to(tl.float64) - 32.0) * s1.to(tl.float64)
        y2 = (((ql0 >> 4) | (((qh >> 4) & 3) << 4)).to(tl.float64) - 32.0) * s2.to(tl.float64)
        y3 = (((ql1 >> 4) | (((qh >> 6) & 3) << 4)).to(tl.float64) - 32.0) * s3.to(tl.float64)
        return y0.to(tl.float16), y1.to(tl.float16), y2.to(tl.float16), y3.to(tl.float16)
    return tl.inline_asm_elementwise(_Q6K_HALF2_ASM, "=r,=r,=r,=r,h,h,h,r,r,r,r", [ql0, ql1, qh, s0, s1, s2, s3],
                                     dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def _q4k_half2_chunk(w_ptr, base, c: tl.constexpr, d, dmin, w1, w2, w3, nm, l32, BN: tl.constexpr, INTERP: tl.constexpr):
    """Inputs 64c .. 64c+63 of Q4_K super-blocks at byte ``base`` [BN, 1]: (the first 32, the next 32) in half2."""
    qb8 = tl.load(w_ptr + base + 16 + 32 * c + l32, mask=nm, other=0)
    sc0, mn0 = _k4_scale_min(w1, w2, w3, 2 * c)
    sc1, mn1 = _k4_scale_min(w1, w2, w3, 2 * c + 1)
    return _q4k_half2(qb8, d * sc0, dmin * mn0, d * sc1, dmin * mn1, BN, INTERP)


@triton.jit
def _q6k_half2_half(w_ptr, w32_ptr, n, nm, K, P1, P2, d, sb, h: tl.constexpr, l32, INTERP: tl.constexpr):
    """Inputs 128h .. 128h+127 of super-block ``sb`` of Q6_K planes (rows ``n``): four [BN, 32] sub-tiles in half2."""
    lo = l32 < 16
    s0 = tl.load(w32_ptr + P2 // 4 + n * (K // 64) + sb * 4 + 2 * h, mask=nm, other=0)
    s1 = tl.load(w32_ptr + P2 // 4 + n * (K // 64) + sb * 4 + 2 * h + 1, mask=nm, other=0)
    qlp = w_ptr + n * (K // 2) + sb * 128 + 64 * h + l32
    ql0 = tl.load(qlp, mask=nm, other=0)
    ql1 = tl.load(qlp + 32, mask=nm, other=0)
    qh8 = tl.load(w_ptr + P1 + n * (K // 4) + sb * 64 + 32 * h + l32, mask=nm, other=0)
    sc0 = tl.where(lo, d * _u2f(_byte(s0, 0) + 128, 8388736.0), d * _u2f(_byte(s0, 1) + 128, 8388736.0))
    sc1 = tl.where(lo, d * _u2f(_byte(s0, 2) + 128, 8388736.0), d * _u2f(_byte(s0, 3) + 128, 8388736.0))
    sc2 = tl.where(lo, d * _u2f(_byte(s1, 0) + 128, 8388736.0), d * _u2f(_byte(s1, 1) + 128, 8388736.0))
    sc3 = tl.where(lo, d * _u2f(_byte(s1, 2) + 128, 8388736.0), d * _u2f(_byte(s1, 3) + 128, 8388736.0))
    return _q6k_half2(ql0, ql1, qh8, sc0.to(tl.float16), sc1.to(tl.float16), sc2.to(tl.float16), sc3.to(tl.float16),
                      INTERP)


@triton.jit(do_not_specialize=["M"])
def qmatmul_tiled_kernel(
    x_ptr, w_ptr, w16_ptr, w32_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, stride_xm, stride_ym, RB, P1, P2, P3, KS, NSEG,
    WTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    BR: tl.constexpr, BN: tl.constexpr, KD: tl.constexpr, SWAP: tl.constexpr, PARTIAL: tl.constexpr,
    HALF2: tl.constexpr = False, INTERP: tl.constexpr = False,
    GDC: tl.constexpr = False,
):
    pdl.enter(GDC)
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    if SWAP:  # grid (column tiles, row tiles, K segments): one segment per program
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        rows0 = tl.program_id(1).to(tl.int64) * BR
        seg_lo = tl.program_id(2)
        seg_hi = seg_lo + 1
    else:  # column-major program order: consecutive row blocks reuse a weight tile while it is in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, GROUP * BR)
        rows0 = (pid % num_m).to(tl.int64) * (GROUP * BR)
        cols = (pid // num_m) * BN + tl.arange(0, BN)
        seg_lo = 0
        seg_hi = NSEG
    n = cols.to(tl.int64)[:, None]
    nm = n < N
    l32 = tl.arange(0, 32)[None, :]
    l64 = tl.arange(0, 64)[None, :]
    first = l64 < 32  # KD = 64: the first 32 inputs of a 64-input dot
    t0 = _zero_acc(BR, BN, SWAP)
    t1 = _zero_acc(BR, BN, SWAP)
    t2 = _zero_acc(BR, BN, SWAP)
    t3 = _zero_acc(BR, BN, SWAP)
    for seg in range(seg_lo, seg_hi):  # K segments (k_split): each chain starts at zero, added in order
        k_lo = seg * KS
        k_hi = tl.minimum(K, k_lo + KS)
        a0 = _zero_acc(BR, BN, SWAP)
        a1 = _zero_acc(BR, BN, SWAP)
        a2 = _zero_acc(BR, BN, SWAP)
        a3 = _zero_acc(BR, BN, SWAP)
        if WTYPE == 8 and KD == 64:  # Q8_0 planes, two blocks per dot (K % 64 == 0)
            for b in range(k_lo // 64, k_hi // 64):
                q = tl.load(w_ptr + n * K + b * 64 + l64, mask=nm, other=0).to(tl.int32)
                dp = w16_ptr + P1 // 2 + n * (K // 32) + 2 * b
                d0 = tl.load(dp, mask=nm, other=0.0).to(tl.float32)
                d1 = tl.load(dp + 1, mask=nm, other=0.0).to(tl.float32)
                w = _u2f(q ^ 128, 8388736.0) * tl.where(first, d0, d1)
                a0, a1, a2, a3 = _acc(w, x_ptr, rows0, b * 64, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 64, SWAP)
        elif WTYPE == 8:  # Q8_0 planes: qs [N, K] i8 at 0, d [N, K/32] f16 at byte P1
            for b in range(k_lo // 32, k_hi // 32):
                q = tl.load(w_ptr + n * K + b * 32 + l32, mask=nm, other=0).to(tl.int32)
                d = tl.load(w16_ptr + P1 // 2 + n * (K // 32) + b, mask=nm, other=0.0).to(tl.float32)
                w = _u2f(q ^ 128, 8388736.0) * d  # (q + 128) - 128
                a0, a1, a2, a3 = _acc(w, x_ptr, rows0, b * 32, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
        elif WTYPE == 12:  # Q4_K blocks {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}, RB bytes per row
            for sb in range(k_lo // 256, k_hi // 256):
                base = n * RB + sb * 144
                d, dmin, w1, w2, w3 = _k_head(w16_ptr, w32_ptr, base, nm)
                for c in tl.static_range(4):  # 64 inputs: low nibbles are the first 32, high the next
                    if KD == 64:  # one dot: each byte read for both of its inputs (the second read hits L1)
                        qb = tl.load(w_ptr + base + 16 + 32 * c + (l64 % 32), mask=nm, other=0).to(tl.int32)
                        sc0, mn0 = _k4_scale_min(w1, w2, w3, 2 * c)
                        sc1, mn1 = _k4_scale_min(w1, w2, w3, 2 * c + 1)
                        q = _u2f(tl.where(first, qb & 15, qb >> 4), 8388608.0)
                        w = tl.where(first, d * sc0, d * sc1) * q - tl.where(first, dmin * mn0, dmin * mn1)
                        a0, a1, a2, a3 = _acc(w, x_ptr, rows0, sb * 256 + 64 * c, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 64, SWAP)
                    elif HALF2:  # fp16 activations only (qmatmul_tiled checks)
                        lo, hi = _q4k_half2_chunk(w_ptr, base, c, d, dmin, w1, w2, w3, nm, l32, BN, INTERP)
                        k0 = sb * 256 + 64 * c
                        a0, a1, a2, a3 = _acc(lo, x_ptr, rows0, k0, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
                        a0, a1, a2, a3 = _acc(hi, x_ptr, rows0, k0 + 32, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
                    else:
                        qb = tl.load(w_ptr + base + 16 + 32 * c + l32, mask=nm, other=0).to(tl.int32)
                        sc, mn = _k4_scale_min(w1, w2, w3, 2 * c)
                        w = (d * sc) * _u2f(qb & 15, 8388608.0) - dmin * mn
                        k0 = sb * 256 + 64 * c
                        a0, a1, a2, a3 = _acc(w, x_ptr, rows0, k0, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
                        sc, mn = _k4_scale_min(w1, w2, w3, 2 * c + 1)
                        w = (d * sc) * _u2f(qb >> 4, 8388608.0) - dmin * mn
                        a0, a1, a2, a3 = _acc(w, x_ptr, rows0, k0 + 32, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
        elif WTYPE == 13:  # Q5_K blocks {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: Q4_K + a 5th bit
            for sb in range(k_lo // 256, k_hi // 256):
                base = n * RB + sb * 176
                d, dmin, w1, w2, w3 = _k_head(w16_ptr, w32_ptr, base, nm)
                for c in tl.static_range(4):  # inputs 64c..64c+63: low nibbles + qh bit 2c, high + bit 2c+1
                    if KD == 64:
                        qb = tl.load(w_ptr + base + 48 + 32 * c + (l64 % 32), mask=nm, other=0).to(tl.int32)
                        qh = tl.load(w_ptr + base + 16 + (l64 % 32), mask=nm, other=0).to(tl.int32)
                        sc0, mn0 = _k4_scale_min(w1, w2, w3, 2 * c)
                        sc1, mn1 = _k4_scale_min(w1, w2, w3, 2 * c + 1)
                        q5 = tl.where(first, (qb & 15) | (((qh >> (2 * c)) & 1) << 4),
                                      (qb >> 4) | (((qh >> (2 * c + 1)) & 1) << 4))
                        w = tl.where(first, d * sc0, d * sc1) * _u2f(q5, 8388608.0) - tl.where(first, dmin * mn0, dmin * mn1)
                        a0, a1, a2, a3 = _acc(w, x_ptr, rows0, sb * 256 + 64 * c, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 64, SWAP)
                    else:
                        qb = tl.load(w_ptr + base + 48 + 32 * c + l32, mask=nm, other=0).to(tl.int32)
                        qh = tl.load(w_ptr + base + 16 + l32, mask=nm, other=0).to(tl.int32)
                        sc, mn = _k4_scale_min(w1, w2, w3, 2 * c)
                        w = (d * sc) * _u2f((qb & 15) | (((qh >> (2 * c)) & 1) << 4), 8388608.0) - dmin * mn
                        k0 = sb * 256 + 64 * c
                        a0, a1, a2, a3 = _acc(w, x_ptr, rows0, k0, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
                        sc, mn = _k4_scale_min(w1, w2, w3, 2 * c + 1)
                        w = (d * sc) * _u2f((qb >> 4) | (((qh >> (2 * c + 1)) & 1) << 4), 8388608.0) - dmin * mn
                        a0, a1, a2, a3 = _acc(w, x_ptr, rows0, k0 + 32, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
        elif WTYPE < 8:  # Q4_0 / Q4_1 / Q5_0 / Q5_1 planes: qs [N, K/2] at 0 (element j of a block: byte j % 16,
            # low nibble below 16), qh [N, K/32] u32 at P1 (Q5: bit j), d [N, K/32] f16 at P2, m at P3 (Q4_1/Q5_1)
            hi = l32 >= 16
            for b in range(k_lo // 32, k_hi // 32):
                qb = tl.load(w_ptr + n * (K // 2) + b * 16 + (l32 % 16), mask=nm, other=0).to(tl.int32)
                q = tl.where(hi, qb >> 4, qb & 15)
                if WTYPE >= 6:
                    qh = tl.load(w32_ptr + P1 // 4 + n * (K // 32) + b, mask=nm, other=0)
                    q = q | (((qh >> l32) & 1) << 4)
                d = tl.load(w16_ptr + P2 // 2 + n * (K // 32) + b, mask=nm, other=0.0).to(tl.float32)
                if WTYPE == 2:
                    w = _u2f(q, 8388616.0) * d  # (q - 8) * d
                elif WTYPE == 6:
                    w = _u2f(q, 8388624.0) * d  # (q - 16) * d
                else:
                    w = _u2f(q, 8388608.0) * d + tl.load(w16_ptr + P3 // 2 + n * (K // 32) + b, mask=nm, other=0.0).to(tl.float32)
                a0, a1, a2, a3 = _acc(w, x_ptr, rows0, b * 32, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
        else:  # Q6_K planes: ql [N, K/2] at 0, qh [N, K/4] at P1, scales [N, K/16] i8 at P2, d [N, K/256] f16 at P3
            lo = l32 < 16
            for sb in range(k_lo // 256, k_hi // 256):
                d = tl.load(w16_ptr + P3 // 2 + n * (K // 256) + sb, mask=nm, other=0.0).to(tl.float32)
                for h in tl.static_range(2):  # 128 inputs: y[l], y[l+32], y[l+64], y[l+96] from ql[l], ql[l+32], qh[l]
                    s0 = tl.load(w32_ptr + P2 // 4 + n * (K // 64) + sb * 4 + 2 * h, mask=nm, other=0)
                    s1 = tl.load(w32_ptr + P2 // 4 + n * (K // 64) + sb * 4 + 2 * h + 1, mask=nm, other=0)
                    k0 = sb * 256 + 128 * h
                    if KD == 64:  # two dots of 64: (y[l], y[l+32]) from ql[0:64] low, then high nibbles
                        ql = tl.load(w_ptr + n * (K // 2) + sb * 128 + 64 * h + l64, mask=nm, other=0).to(tl.int32)
                        qh = tl.load(w_ptr + P1 + n * (K // 4) + sb * 64 + 32 * h + (l64 % 32), mask=nm, other=0).to(tl.int32)
                        for p in tl.static_range(2):
                            word = s0 if p == 0 else s1  # scales 8h + 4p + (0..3), 16 inputs each
                            sa = d * _u2f(_byte(word, 0) + 128, 8388736.0)
                            sb_ = d * _u2f(_byte(word, 1) + 128, 8388736.0)
                            sc_ = d * _u2f(_byte(word, 2) + 128, 8388736.0)
                            sd = d * _u2f(_byte(word, 3) + 128, 8388736.0)
                            scale = tl.where(l64 < 16, sa, tl.where(l64 < 32, sb_, tl.where(l64 < 48, sc_, sd)))
                            low = ql & 15 if p == 0 else ql >> 4
                            q = low | (((qh >> (4 * p + 2 * (l64 // 32))) & 3) << 4)
                            w = scale * _u2f(q, 8388640.0)  # (d*sc) * (q - 32)
                            a0, a1, a2, a3 = _acc(w, x_ptr, rows0, k0 + 64 * p, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 64, SWAP)
                    elif HALF2:  # fp16 activations only (qmatmul_tiled checks)
                        y0, y1, y2, y3 = _q6k_half2_half(w_ptr, w32_ptr, n, nm, K, P1, P2, d, sb, h, l32, INTERP)
                        a0, a1, a2, a3 = _acc(y0, x_ptr, rows0, k0, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
                        a0, a1, a2, a3 = _acc(y1, x_ptr, rows0, k0 + 32, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
                        a0, a1, a2, a3 = _acc(y2, x_ptr, rows0, k0 + 64, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
                        a0, a1, a2, a3 = _acc(y3, x_ptr, rows0, k0 + 96, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
                    else:
                        qlp = w_ptr + n * (K // 2) + sb * 128 + 64 * h + l32
                        ql0 = tl.load(qlp, mask=nm, other=0).to(tl.int32)
                        ql1 = tl.load(qlp + 32, mask=nm, other=0).to(tl.int32)
                        qh = tl.load(w_ptr + P1 + n * (K // 4) + sb * 64 + 32 * h + l32, mask=nm, other=0).to(tl.int32)
                        for t in tl.static_range(4):
                            word = s0 if t < 2 else s1
                            sa = _u2f(_byte(word, (2 * t) % 4) + 128, 8388736.0)
                            sz = _u2f(_byte(word, (2 * t) % 4 + 1) + 128, 8388736.0)
                            scale = tl.where(lo, d * sa, d * sz)
                            src = ql0 if t % 2 == 0 else ql1
                            low = src & 15 if t < 2 else src >> 4
                            q = low | (((qh >> (2 * t)) & 3) << 4)
                            w = scale * _u2f(q, 8388640.0)  # (d*sc) * (q - 32)
                            a0, a1, a2, a3 = _acc(w, x_ptr, rows0, k0 + 32 * t, a0, a1, a2, a3, M, stride_xm, GROUP, BR, IEEE, 32, SWAP)
        t0 += a0
        t1 += a1
        t2 += a2
        t3 += a3
    r = rows0 + tl.arange(0, BR)
    if SWAP:
        if PARTIAL:  # this segment's fp32 chain, summed in segment order by _segments_sum_kernel
            offs = (seg_lo.to(tl.int64) * M + r[None, :]) * N + cols[:, None]
            tl.store(part_ptr + offs, t0, mask=(r[None, :] < M) & (cols[:, None] < N))
        else:
            _store_rows(y_ptr, b_ptr, tl.trans(t0), r, cols, M, N, stride_ym, HAS_BIAS)
    else:
        _store_rows(y_ptr, b_ptr, t0, r, cols, M, N, stride_ym, HAS_BIAS)
        if GROUP > 1:
            _store_rows(y_ptr, b_ptr, t1, r + BR, cols, M, N, stride_ym, HAS_BIAS)
        if GROUP > 2:
            _store_rows(y_ptr, b_ptr, t2, r + 2 * BR, cols, M, N, stride_ym, HAS_BIAS)
            _store_rows(y_ptr, b_ptr, t3, r + 3 * BR, cols, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _segments_sum_kernel(part_ptr, b_ptr, y_ptr, M, N, NSEG, stride_ym, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                         GDC: tl.constexpr = False):
    """y = (0 + p_0 + p_1 + ... + p_{NSEG-1}) (+ bias), in fp32 and that order, rounded once: the
    same additions the unswapped kernel makes at its segment ends, so a row's bits do not depend
    on which form (which M) computed it."""
    pdl.enter(GDC)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, NSEG):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    rows = offs // N
    cols = offs % N
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if y_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(y_ptr + rows * stride_ym + cols, _round_bf16(acc), mask=mask)
    else:
        tl.store(y_ptr + rows * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _planes(w: QWeight) -> tuple[int, int, int]:
    """Byte offsets of the planes after the first (qlayout's order; the kernel's P1, P2, P3)."""
    nk = w.n * w.k
    t = w.ggml_type
    if t == GGMLType.Q8_0:
        return nk, 0, 0
    if t == GGMLType.Q6_K:
        return nk // 2, nk // 2 + nk // 4, nk // 2 + nk // 4 + nk // 16
    if t in (GGMLType.Q4_0, GGMLType.Q4_1):  # qs, d[, m]
        return 0, nk // 2, nk // 2 + nk // 16
    if t in (GGMLType.Q5_0, GGMLType.Q5_1):  # qs, qh, d[, m]
        return nk // 2, nk // 2 + nk // 8, nk // 2 + nk // 8 + nk // 16
    return 0, 0, 0


def k_segments(n: int, k: int) -> tuple[int, int]:
    """(inputs per segment, segments) for an [n, k] weight: a function of the shape only, never of M.

    A narrow matrix (a 7B's qkv/o/down: 56-72 column tiles on 132 SMs) cannot keep the GPU busy at
    decode by columns alone; its K is cut into up to MAX_SEGMENTS segments (multiples of a
    super-block) that the swapped form runs as separate programs. Every form sums the same
    segments' chains in the same order, so the cut changes no row between M = 1 and a prefill.
    probe_swap_q4k.py (H200, Q4_K, M = 1): 7B down 0.146 -> 0.045 ms with 8 segments, qkv 0.029 -> 0.014.
    """
    cols = -(-n // SWAP_BN)
    want = 1
    while want < MAX_SEGMENTS and cols * want < TARGET_PROGRAMS:
        want *= 2
    per = -(-k // want)
    ks = -(-per // SEG_UNIT) * SEG_UNIT
    return ks, -(-k // ks)


def qmatmul_tiled(
    x: torch.Tensor,
    w: QWeight,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: tuple[int, ...] | None = None,
    swap: bool | None = None,
    half2: bool | None = None,
) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W[N, K].T (+ bias); ``out`` may be a column slice (qmatmul checked the shapes).
    ``swap`` (default: M <= SWAP_MAX_M) runs the swapped form; ``config`` overrides ``launch_config``
    (benchmarks, tests): rows per dot (the swapped form: rows per program), GROUP_M, BN, warps,
    stages [, inputs per dot: 32 (default) or 64]. ``half2`` (default: the weight's ``half2``): Q4_K/Q6_K with
    fp16 activations dequantized in packed half2 arithmetic (``half2_weight``'s values, 32-input dots)."""
    v.check(supports(w), KERNEL, "w", f"{w.ggml_type.name} (planar={w.planar}) does not run here")
    v.check(w.raw.data_ptr() % 16 == 0, KERNEL, "w", "block bytes must be 16-byte aligned")
    if w.fragments:
        v.check(x.dtype == torch.float16 and config is None and half2 in (None, True), KERNEL, "w",
                f"a weight in fragment order takes fp16 activations and its own values (no config or half2), not {x.dtype}")
        return fragments.fragments_matmul(x, w, bias, out, swap=swap)
    M = x.shape[0]
    swap = M <= SWAP_MAX_M if swap is None else swap
    if swap:
        cfg = config or (16 if M <= 16 else 32, 1, SWAP_BN, 4, 3)
    elif x.device.type == "cuda":
        cfg = config or launch_config(M, w.n, w.k, w.ggml_type)
    else:
        cfg = config or (16, 1 if M <= 16 else 2 if M <= 32 else 4, 16, 4, 1)  # interpreter: small tiles
    br, gm, bn, warps, stages = cfg[:5]
    kd = cfg[5] if len(cfg) > 5 else 32  # inputs per dot: 32, or 64 (two sub-tiles in one dot)
    if kd == 64 and (w.k % 64 or w.ggml_type in _BLOCKS_32):
        kd = 32
    v.check(not swap or gm == 1, KERNEL, "config", "the swapped form takes GROUP_M = 1")
    half2 = w.half2 if half2 is None else half2
    if half2:
        v.check(w.ggml_type in HALF2_TYPES and x.dtype == torch.float16, KERNEL, "half2",
                f"packed half2 dequantization is for Q4_K/Q6_K with fp16 activations, not {w.ggml_type.name}/{x.dtype}")
        kd = 32
    raw = w.raw
    w16 = raw[: raw.numel() // 2 * 2].view(torch.int16).view(torch.float16)
    w32 = raw[: raw.numel() // 4 * 4].view(torch.int32)
    p1, p2, p3 = _planes(w)
    ks, nseg = k_segments(w.n, w.k)
    partial = swap and nseg > 1
    part = torch.empty((nseg, M, w.n), dtype=torch.float32, device=x.device) if partial else out
    if swap:
        grid: tuple[int, ...] = (triton.cdiv(w.n, bn), triton.cdiv(M, br), nseg)
    else:
        grid = (triton.cdiv(M, gm * br) * triton.cdiv(w.n, bn),)
    qmatmul_tiled_kernel[grid](
        x, raw, w16, w32, bias if bias is not None else out, out, part,
        M, w.n, w.k, x.stride(0), out.stride(0), w.row_bytes, p1, p2, p3, ks, nseg,
        WTYPE=int(w.ggml_type), HAS_BIAS=bias is not None, GROUP=gm, BR=br, BN=bn, KD=kd,
        SWAP=swap, PARTIAL=partial, HALF2=half2, INTERP=x.device.type == "cpu",
        num_warps=warps, num_stages=stages, enable_fp_fusion=False,
        **pdl.opts(x),
    )
    if partial:
        _segments_sum_kernel[(triton.cdiv(M * w.n, SUM_BLOCK),)](
            part, bias if bias is not None else out, out, M, w.n, nseg, out.stride(0),
            HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK, num_warps=4,
            **pdl.opts(part),
        )
    return out


def segments_reference(x: torch.Tensor, wd: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What this kernel computes, built from the dense kernel (tests, benchmarks): the unsplit fp32
    chain of each ``k_segments`` segment on the dequantized weight ``wd``, added in segment order
    (+ bias), rounded once to x's dtype. Bitwise equal on the GPU where the dense kernel's rows are."""
    from .matmul_dense import dense_matmul

    n, k = wd.shape
    ks, nseg = k_segments(n, k)
    acc = None
    for s in range(nseg):
        lo, hi = s * ks, min(k, (s + 1) * ks)
        p = dense_matmul(x[:, lo:hi].contiguous(), wd[:, lo:hi].contiguous(), splits=1, out_dtype=torch.float32)
        acc = p if acc is None else acc + p
    assert acc is not None
    return (acc if bias is None else acc + bias.float()).to(x.dtype)



@triton.jit
def _half2_dequant_kernel(w_ptr, w32_ptr, w16_ptr, y_ptr, N, K, RB, P1, P2, P3,
                          WTYPE: tl.constexpr, BN: tl.constexpr, INTERP: tl.constexpr):
    """y[N, K] fp16 = the weight as ``half2=True`` multiplies by: one program per (BN rows, super-block)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    sb = tl.program_id(1)
    n = cols.to(tl.int64)[:, None]
    nm = n < N
    l32 = tl.arange(0, 32)[None, :]
    yp = y_ptr + n * K + sb * 256 + l32
    if WTYPE == 12:
        base = n * RB + sb * 144
        d, dmin, w1, w2, w3 = _k_head(w16_ptr, w32_ptr, base, nm)
        for c in tl.static_range(4):
            lo, hi = _q4k_half2_chunk(w_ptr, base, c, d, dmin, w1, w2, w3, nm, l32, BN, INTERP)
            tl.store(yp + 64 * c, lo, mask=nm)
            tl.store(yp + 64 * c + 32, hi, mask=nm)
    else:
        d = tl.load(w16_ptr + P3 // 2 + n * (K // 256) + sb, mask=nm, other=0.0).to(tl.float32)
        for h in tl.static_range(2):
            y0, y1, y2, y3 = _q6k_half2_half(w_ptr, w32_ptr, n, nm, K, P1, P2, d, sb, h, l32, INTERP)
            tl.store(yp + 128 * h, y0, mask=nm)
            tl.store(yp + 128 * h + 32, y1, mask=nm)
            tl.store(yp + 128 * h + 64, y2, mask=nm)
            tl.store(yp + 128 * h + 96, y3, mask=nm)


def half2_dequant(w: QWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] fp16 on w's device: ``half2_weight``'s values (a Q8_0 weight in fragment order: ggml's), computed
    by the fused kernels' own code (the prefill path's scratch, so its rows equal the fused kernels' bit for bit)."""
    if w.fragments:
        return fragments.fragments_dequant(w, out)
    v.check(w.ggml_type in HALF2_TYPES and w.planar == (w.ggml_type == GGMLType.Q6_K), KERNEL, "w",
            f"half2 dequantization takes Q4_K blocks or Q6_K planes, not {w.ggml_type.name} (planar={w.planar})")
    y = out if out is not None else torch.empty(w.n, w.k, dtype=torch.float16, device=w.raw.device)
    v.check(y.shape == (w.n, w.k) and y.dtype == torch.float16 and y.is_contiguous(), KERNEL, "out",
            f"must be a contiguous fp16 [{w.n}, {w.k}]")
    raw = w.raw
    w16 = raw[: raw.numel() // 2 * 2].view(torch.int16).view(torch.float16)
    w32 = raw[: raw.numel() // 4 * 4].view(torch.int32)
    p1, p2, p3 = _planes(w)
    bn = 64 if raw.device.type == "cuda" else 16
    _half2_dequant_kernel[(triton.cdiv(w.n, bn), w.k // 256)](
        raw, w32, w16, y, w.n, w.k, w.row_bytes, p1, p2, p3, WTYPE=int(w.ggml_type), BN=bn,
        INTERP=raw.device.type == "cpu", num_warps=4, enable_fp_fusion=False,
    )
    return y


def q4k_half2_weight(w: QWeight) -> torch.Tensor:
    """[n, k] fp16: what ``half2=True`` dequantizes a Q4_K weight to — q * fp16(d*sc) - fp16(dmin*mn),
    computed in float64 (exact) and rounded once, as fma.rn.f16x2 does (references for tests, benchmarks)."""
    v.check(w.ggml_type == GGMLType.Q4_K and not w.planar, KERNEL, "w", "a Q4_K weight as the file's blocks")
    b = w.gguf_bytes().reshape(-1, 144).to("cpu")
    d = b[:, 0:2].contiguous().view(torch.float16).float()  # [nb, 1]
    dmin = b[:, 2:4].contiguous().view(torch.float16).float()
    q = b[:, 4:16].to(torch.int32)  # the 12 scale bytes
    sc = torch.empty(b.shape[0], 8, dtype=torch.int32)
    mn = torch.empty_like(sc)
    for j in range(8):  # get_scale_min_k4
        if j < 4:
            sc[:, j], mn[:, j] = q[:, j] & 63, q[:, j + 4] & 63
        else:
            sc[:, j] = (q[:, j + 4] & 15) | ((q[:, j - 4] >> 6) << 4)
            mn[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    s = (d * sc.float()).to(torch.float16).double()  # [nb, 8]: fp32 product rounded to fp16, as the kernel
    m = (dmin * mn.float()).to(torch.float16).double()
    qs = b[:, 16:].to(torch.int32).reshape(-1, 4, 32)  # 4 chunks of 32 bytes: low nibbles, then high
    nib = torch.stack([qs & 15, qs >> 4], dim=2).reshape(-1, 8, 32).double()  # sub-block 2c, 2c+1
    out = (nib * s[:, :, None] - m[:, :, None]).to(torch.float16)
    return out.reshape(w.n, w.k).to(w.raw.device)


def q6k_half2_weight(w: QWeight) -> torch.Tensor:
    """[n, k] fp16: what ``half2=True`` dequantizes a (planar) Q6_K weight to — fp16(d*sc) * (q - 32),
    computed in float64 (exact) and rounded once, as mul.rn.f16x2 does."""
    v.check(w.ggml_type == GGMLType.Q6_K and (w.planar or w.fragments), KERNEL, "w",
            "a Q6_K weight in qlayout's planes or fragment order")
    n, k = w.n, w.k
    raw = (w.raw if w.planar else to_planes(w.gguf_bytes(), GGMLType.Q6_K, n, k)).to("cpu")
    p1, p2, p3 = _planes(w)
    ql = raw[:p1].reshape(n, k // 256, 2, 64).to(torch.int32)  # [row, super-block, half, 64 bytes]
    qh = raw[p1:p2].reshape(n, k // 256, 2, 32).to(torch.int32)
    sc = raw[p2:p3].view(torch.int8).reshape(n, k // 256, 2, 8).float()
    d = raw[p3 : p3 + n * (k // 256) * 2].view(torch.float16).reshape(n, k // 256, 1, 1).float()
    s = (d * sc).to(torch.float16).double()  # [n, sb, 2, 8]: fp32 product rounded to fp16, as the kernel
    lo, hi = ql[..., :32], ql[..., 32:]
    q = torch.stack([(lo & 15) | ((qh & 3) << 4), (hi & 15) | (((qh >> 2) & 3) << 4),
                     (lo >> 4) | (((qh >> 4) & 3) << 4), (hi >> 4) | (((qh >> 6) & 3) << 4)], dim=3)  # [n, sb, 2, 4, 32]
    scale = s.reshape(n, k // 256, 2, 4, 2).repeat_interleave(16, dim=4)  # sub-tile t, positions l < 16 / l >= 16
    out = ((q.double() - 32.0) * scale).to(torch.float16)
    return out.reshape(n, k).to(w.raw.device)


def half2_weight(w: QWeight) -> torch.Tensor:
    """The fp16 values ``half2=True`` multiplies by (``q4k_half2_weight`` / ``q6k_half2_weight``)."""
    return q4k_half2_weight(w) if w.ggml_type == GGMLType.Q4_K else q6k_half2_weight(w)


from . import fragments  # noqa: E402  (it uses this module's helpers)
