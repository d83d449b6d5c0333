"""Q4_K, Q6_K and Q8_0 weights in the tensor core's fragment order: y = x · Wᵀ with one 16-byte load per thread,
2 rows and 64 inputs (Q8_0: 32).

Why: ``qmatmul_tiled``'s swapped form dequantizes blocks as the file stores them. A thread's share of a
wgmma A fragment (rows g and g + 8 of its warp's 16, inputs 2t, 2t+1, 2t+8, 2t+9, +16, ...) is scattered
over a block, so Triton reads it two bytes at a time and spreads them with PRMTs; Q4_K's 6-bit scales were
unpacked one value at a time in fp32: 740 SASS instructions per super-block and thread on sm_90, the
kernel instruction-bound at 0.6-1.2 TB/s (RESULTS, ninth session). Here a deterministic repacking made at
load (``qlayout.to_fragments`` / ``q6k_to_fragments`` / ``q8_to_fragments``; same size) stores each 64-row
group's quants so that a thread's bytes are contiguous, in the order its registers need, and scales are
unpacked in 32-bit words into fp16 pairs: Q4_K 455-495 instructions per super-block, Q6_K 651, Q8_0 282 per
128 inputs (RESULTS, fourteenth session: 1.3-2.7x per matrix, a 7B Q4_K_M decode step 5.9 -> 3.8 ms).

Layouts of an [N, K] weight (N % 64 == 0; byte maps in ``qlayout``):

* Q4_K: quants, N*K/2 bytes: for row group G (rows 64G ..), chunk j (inputs 64j .. 64j+63, Q4_K byte chunk
  j % 4 of super-block j // 4), a 2048-byte tile; byte (w, g, t, b3, b2, y, x) of the tile (row-major
  over [4, 8, 4, 2, 2, 2, 2]) is byte 16*b3 + 8*b2 + 2*t + y of the chunk's 32 for row 16w + 8x + g:
  its low nibble is input 64j + that byte's index, its high nibble input 64j + 32 + it; then the
  heads, N*K/256 * 16 bytes (f16 d, f16 dmin, the 12 scale bytes) in row order, as in the file;
* Q6_K: per row group and 128 inputs two such nibble tiles (the low 4 bits of q) and one tile of their
  high 2-bit fields; then the int8 scales [N, K/16] and d [N, K/256];
* Q8_0: per row group and 32-input block a 2048-byte tile of the bytes (w, g, t, b3, b2, x, y); then d.

The values are the other kernels' (Q4_K/Q6_K: ``half2_weight``'s, one fp16 rounding; Q8_0: ggml's rounded
once) and each output element is the same chain of k16 tensor-core steps in k order over the same K
segments (``k_segments``): a row's bits equal the blocks'/planes' kernels' and the dense kernel's on those
values (tests/test_fragments.py, on the GPU too), at every M.

With the weight's counters (``QWeight.locks``, a few KB per matrix, bound by ``weights.bind``) a decode
launch with several K segments adds them itself: the last segment of a (row group, token tile) to finish
(an acq_rel counter, as ``matmul_dense``'s split) adds the fp32 partials in segment order, then the bias,
and rounds once -- ``_segments_sum_kernel``'s additions, one launch fewer per matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...gguf.constants import GGMLType
from ..qlayout import FRAGMENT_ROWS
from ..qweight import QWeight
from . import pdl
from . import qmatmul_tiled as T
from . import validate as v

KERNEL = "fragments"
ROWS = FRAGMENT_ROWS
FUSE_MAX_M = 16  # the in-launch segment sum pays below this; at M=64 its serial tail loses (probe, 15th session)
PARTS_MAX_M = 16  # qlinear stacks same-type parts up to this: 7B Q4_K_M step B=16 -5 %, B=64 +5 % (16th session)
MIXED_PARTS = True  # a third part of another type joins the launch (Q4_K_M's v); profile_step --mixed-parts off
DOT_K = 32  # inputs per tensor-core dot in the Q4_K chain: 64 = one dot per chunk (half the wgmma waits and fences,
# 502 -> 475 SASS instructions per super-block, registers 64 -> 72; the same k16 steps in the same order); A/B pending
# (profile_step --dot-k), so 32 stays the default
STAGES_BY_SHAPE = True  # pipeline depth per type and K segment (``swap_stages``); profile_step --frag-stages 3
MIN_BR = 16  # tokens per decode program up to 8 rows: 8 halves the x tiles in shared memory (Q4_K at 3 stages 43 -> 31 KB,
# the H200's 5 -> 7 blocks per SM; Q6_K at 2 stages 30 -> 22 KB) -- A/B pending (profile_step --min-br), so 16 stays


def swap_br(m: int) -> int:
    """Tokens per program of the swapped (decode) form: the tensor core's N. Every size gives a row the same k16
    chains (the GPU tests compare rows across M), so this is a choice of speed only."""
    return (MIN_BR if m <= MIN_BR else 16) if m <= 16 else 32 if m <= 32 else 64


def swap_stages(wtype: GGMLType, ks: int, m: int) -> int:
    """Software-pipeline depth of a decode launch (16 tokens per program): a choice of speed only -- the chains
    and their order do not change. probe_fragments --sweep (H200, 18th session): 2 stages beat 3 on Q6_K
    (7B down 30.6 -> 28.3 us, head 161 -> 142) and Q8_0 (7B gate_up 56.5 -> 43.6) and on short Q4_K segments
    (1.5B gate_up 12.4 -> 11.0, q 4.9 -> 4.6); 3 stay faster on long Q4_K ones (7B gate_up 35.6 vs 36.4)."""
    if not STAGES_BY_SHAPE or m > 16:  # 16 tokens per program: the tile the probe timed
        return 3
    return 2 if wtype != GGMLType.Q4_K or ks <= 512 else 3


# 4 quant bytes (e0, e2, e1, e3 of the pack: the word's bytes 0/2 are elements 0/1) -> elements 0..3 of the
# low-nibble and the high-nibble tensors, q * s - m with one fp16 rounding (s, -m per element: $5.. and $9..
# for the low nibbles, $13.. and $17.. for the high; elements 0/1 share a row, 2/3 share the other)
_DQ = tl.constexpr("""
{
.reg .b32 w8, t0, t1, t2, t3, km, kh, ke, k16, kn64;
mov.b32 km, 0x000F000F;
mov.b32 kh, 0x00F000F0;
mov.b32 ke, 0x64006400;
mov.b32 k16, 0x2C002C00;
mov.b32 kn64, 0xD400D400;
shr.b32 w8, $4, 8;
lop3.b32 t0, $4, km, ke, 0xea;
lop3.b32 t1, w8, km, ke, 0xea;
lop3.b32 t2, $4, kh, ke, 0xea;
lop3.b32 t3, w8, kh, ke, 0xea;
sub.f16x2 t0, t0, ke;
sub.f16x2 t1, t1, ke;
fma.rn.f16x2 t2, t2, k16, kn64;
fma.rn.f16x2 t3, t3, k16, kn64;
fma.rn.f16x2 $0, t0, $5, $9;
fma.rn.f16x2 $1, t1, $7, $11;
fma.rn.f16x2 $2, t2, $13, $17;
fma.rn.f16x2 $3, t3, $15, $19;
}
""")


def _head_src(c: int) -> str:
    """PTX: a row's super-block head (d | dmin << 16, scale words 1-3) -> (s, s), (-m, -m) of sub-blocks 2c, 2c+1."""
    a, ma = ("a", "ma") if c < 2 else ("b", "mb")
    sel = "0x4140" if c % 2 == 0 else "0x4342"
    # bytes (2c % 4, 2c % 4 + 1) of a word -> fp16 pair -> times (d, d) / (-dmin, -dmin) -> each value broadcast
    pairs = "\n".join(f"prmt.b32 s, {src}, k64, {sel};\nsub.f16x2 s, s, ke;\nmul.rn.f16x2 s, s, {mul};\n"
                       f"mov.b32 {{dl, dh}}, s;\nmov.b32 ${lo}, {{dl, dl}};\nmov.b32 ${hi}, {{dh, dh}};"
                       for src, mul, lo, hi in ((a, "dd", 0, 2), (ma, "nn", 1, 3)))
    return f"""
{{
.reg .b32 a, b, ma, mb, t, dd, nn, ke, s, k64;
.reg .b16 dl, dh;
mov.b32 ke, 0x64006400;
mov.b32 k64, 0x64646464;
mov.b32 {{dl, dh}}, $4;
mov.b32 dd, {{dl, dl}};
mov.b32 nn, {{dh, dh}};
neg.f16x2 nn, nn;
and.b32 a, $5, 0x3F3F3F3F;
and.b32 ma, $6, 0x3F3F3F3F;
shr.b32 t, $5, 2;
and.b32 t, t, 0x30303030;
and.b32 b, $7, 0x0F0F0F0F;
or.b32 b, b, t;
shr.b32 t, $6, 2;
and.b32 t, t, 0x30303030;
shr.b32 mb, $7, 4;
and.b32 mb, mb, 0x0F0F0F0F;
or.b32 mb, mb, t;
{pairs}
}}
"""


_HEAD0 = tl.constexpr(_head_src(0))
_HEAD1 = tl.constexpr(_head_src(1))
_HEAD2 = tl.constexpr(_head_src(2))
_HEAD3 = tl.constexpr(_head_src(3))
SHAPE7 = tl.constexpr((4, 8, 4, 2, 2, 2, 2))  # a tile: (w, g, t, b3, b2, y, x)


@triton.jit
def _u2h(v):
    """int32 in [0, 2048) -> fp16, exact (interpreter)."""
    return v.to(tl.float64).to(tl.float16)


@triton.jit
def _head_interp(dm, w1, w2, w3, c: tl.constexpr):
    """_head_src's values in the interpreter (float64, rounded once), as fp16 per row: s, -m for 2c, 2c+1."""
    d = (dm & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)
    dmin = ((dm >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)
    if c < 2:
        sw = w1 & 0x3F3F3F3F
        mw = w2 & 0x3F3F3F3F
    else:
        sw = (w3 & 0x0F0F0F0F) | ((w1 >> 2) & 0x30303030)
        mw = ((w3 >> 4) & 0x0F0F0F0F) | ((w2 >> 2) & 0x30303030)
    sh0 = 16 * (c % 2)
    s0 = (d * ((sw >> sh0) & 255).to(tl.float64)).to(tl.float16)
    s1 = (d * ((sw >> (sh0 + 8)) & 255).to(tl.float64)).to(tl.float16)
    n0 = (-(dmin * ((mw >> sh0) & 255).to(tl.float64))).to(tl.float16)
    n1 = (-(dmin * ((mw >> (sh0 + 8)) & 255).to(tl.float64))).to(tl.float16)
    return s0, n0, s1, n1


@triton.jit
def _chunk(qb, dm, w1, w2, w3, c: tl.constexpr, INTERP: tl.constexpr):
    """A tile's bytes [128, 16] and its rows' heads ([4, 8, 1, 1, 1, 2, 1] words) -> the two [64, 32] fp16
    A operands: inputs 64c .. 64c+31 (low nibbles) and 64c+32 .. 64c+63 (high), rows in order."""
    qb = tl.reshape(qb, (4, 8, 4, 2, 2, 2, 2))
    if INTERP:
        s0, n0, s1, n1 = _head_interp(dm, w1, w2, w3, c)
        q = tl.permute(qb, (0, 1, 2, 3, 4, 6, 5)).to(tl.int32)  # (.., y, x) -> (.., x, y): what the PTX does
        lo = ((q & 15).to(tl.float64) * s0.to(tl.float64) + n0.to(tl.float64)).to(tl.float16)
        hi = ((q >> 4).to(tl.float64) * s1.to(tl.float64) + n1.to(tl.float64)).to(tl.float16)
    else:
        if c == 0:
            src: tl.constexpr = _HEAD0
        elif c == 1:
            src: tl.constexpr = _HEAD1
        elif c == 2:
            src: tl.constexpr = _HEAD2
        else:
            src: tl.constexpr = _HEAD3
        s0, n0, s1, n1 = tl.inline_asm_elementwise(src, "=r,=r,=r,=r,r,r,r,r", [dm, w1, w2, w3],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        lo, hi = tl.inline_asm_elementwise(
            _DQ, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [qb, tl.broadcast_to(s0, SHAPE7), tl.broadcast_to(n0, SHAPE7), tl.broadcast_to(s1, SHAPE7),
             tl.broadcast_to(n1, SHAPE7)], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    # (w, g, t, b3, b2, x, y) -> rows (w, x, g), inputs (b3, b2, t, y)
    lo = tl.reshape(tl.permute(lo, (0, 5, 1, 3, 4, 2, 6)), (64, 32))
    hi = tl.reshape(tl.permute(hi, (0, 5, 1, 3, 4, 2, 6)), (64, 32))
    return lo, hi


# Q6_K: 4 nibble bytes + the 4 bytes of their high bits (tiles at the same place) -> elements 0..3 of the low-
# and high-nibble tensors, (q - 32) * s with one fp16 rounding; tile c (0 / 1) of its pair picks the bit fields
def _q6k_dq_src(c: int) -> str:
    sh = ("shl.b32 h0, $5, 4;", "shr.b32 h1, $5, 4;", "shl.b32 h2, $5, 2;", "shr.b32 h3, $5, 6;") if c == 0 else (
        "mov.b32 h0, $5;", "shr.b32 h1, $5, 8;", "shr.b32 h2, $5, 2;", "shr.b32 h3, $5, 10;")
    # output i: (low 4 bits from the nibble word shifted, 2 high bits at bits 4-5) | 0x6400, - (1024 + 32), x scale
    values = "\n".join(f"lop3.b32 q, h{i}, m2, ke, 0xea;\nlop3.b32 q, {nib}, m4, q, 0xea;\nsub.f16x2 q, q, k1056;\n"
                        f"mul.rn.f16x2 ${i}, q, ${scale};"
                        for i, (nib, scale) in enumerate((("$4", 6), ("w8", 8), ("w4", 10), ("w12", 12))))
    return f"""
{{
.reg .b32 w8, w4, w12, h0, h1, h2, h3, q, m4, m2, ke, k1056;
mov.b32 m4, 0x000F000F;
mov.b32 m2, 0x00300030;
mov.b32 ke, 0x64006400;
mov.b32 k1056, 0x64206420;
shr.b32 w8, $4, 8;
shr.b32 w4, $4, 4;
shr.b32 w12, $4, 12;
{sh[0]}
{sh[1]}
{sh[2]}
{sh[3]}
{values}
}}
"""


def _i8x4(src: str) -> str:
    """PTX: the 4 signed bytes of ``src`` -> a = (b0, b1), b = (b2, b3) as exact fp16 pairs (needs .b32 a, b, k64, kx, k1152)."""
    return (f"mov.b32 k64, 0x64646464;\nmov.b32 kx, 0x00800080;\nmov.b32 k1152, 0x64806480;\n"
            f"prmt.b32 a, {src}, k64, 0x4140;\nprmt.b32 b, {src}, k64, 0x4342;\nxor.b32 a, a, kx;\nxor.b32 b, b, kx;\n"
            f"sub.f16x2 a, a, k1152;\nsub.f16x2 b, b, k1152;")


_Q6K_DQ0 = tl.constexpr(_q6k_dq_src(0))
_Q6K_DQ1 = tl.constexpr(_q6k_dq_src(1))
# a row's 4 int8 scales of a 64-input chunk (one word) and its d -> (s_j, s_j) = fp16(d * sc_j), j = 0..3
_Q6K_SCALES = tl.constexpr("""
{
.reg .b32 a, b, dd, k64, kx, k1152;
.reg .b16 lo, hi;
mov.b32 dd, {$5, $5};
""" + _i8x4("$4") + """
mul.rn.f16x2 a, a, dd;
mul.rn.f16x2 b, b, dd;
mov.b32 {lo, hi}, a;
mov.b32 $0, {lo, lo};
mov.b32 $1, {hi, hi};
mov.b32 {lo, hi}, b;
mov.b32 $2, {lo, lo};
mov.b32 $3, {hi, hi};
}
""")


@triton.jit
def _q6k_chunk(nib, hq, sw, dh, c: tl.constexpr, INTERP: tl.constexpr):
    """Tile c (0/1) of a Q6_K pair ([128, 16] nibble bytes), the pair's high bits, its rows' scale words and d
    ([4, 8, 1, 1, 1, 2, 1]) -> the two [64, 32] fp16 A operands: inputs +0 .. +31 and +32 .. +63 of the chunk."""
    nib = tl.reshape(nib, (4, 8, 4, 2, 2, 2, 2))
    hq = tl.reshape(hq, (4, 8, 4, 2, 2, 2, 2))
    b3 = tl.arange(0, 2)[None, None, None, :, None, None, None]
    if INTERP:
        q = tl.permute(nib, (0, 1, 2, 3, 4, 6, 5)).to(tl.int32)  # (.., y, x) -> (.., x, y), as the PTX
        h = tl.permute(hq, (0, 1, 2, 3, 4, 6, 5)).to(tl.int32)
        d = dh.to(tl.float64)
        sa = (d * tl.where(b3 == 0, (sw << 24) >> 24, (sw << 16) >> 24).to(tl.float64)).to(tl.float16)
        sb = (d * tl.where(b3 == 0, (sw << 8) >> 24, sw >> 24).to(tl.float64)).to(tl.float16)
        qa = (q & 15) | (((h >> (4 * c)) & 3) << 4)
        qb = (q >> 4) | (((h >> (4 * c + 2)) & 3) << 4)
        lo = ((qa - 32).to(tl.float64) * sa.to(tl.float64)).to(tl.float16)
        hi = ((qb - 32).to(tl.float64) * sb.to(tl.float64)).to(tl.float16)
    else:
        s0, s1, s2, s3 = tl.inline_asm_elementwise(_Q6K_SCALES, "=r,=r,=r,=r,r,h", [sw, dh],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        sa = tl.broadcast_to(tl.where(b3 == 0, s0, s1), SHAPE7)
        sb = tl.broadcast_to(tl.where(b3 == 0, s2, s3), SHAPE7)
        if c == 0:
            src: tl.constexpr = _Q6K_DQ0
        else:
            src: tl.constexpr = _Q6K_DQ1
        lo, hi = tl.inline_asm_elementwise(src, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [nib, hq, sa, sb],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    lo = tl.reshape(tl.permute(lo, (0, 5, 1, 3, 4, 2, 6)), (64, 32))
    hi = tl.reshape(tl.permute(hi, (0, 5, 1, 3, 4, 2, 6)), (64, 32))
    return lo, hi


# Q8_0: 4 bytes of a tile (elements 0..3; 0/1 share a row, 2/3 the other) and d per element ($3, $4: the two
# rows' (d, d)) -> fp16(q * d), one rounding: the values the quantized residency has always used for Q8_0
_Q8_DQ = tl.constexpr("""
{
.reg .b32 a, b, k64, kx, k1152;
""" + _i8x4("$2") + """
mul.rn.f16x2 $0, a, $3;
mul.rn.f16x2 $1, b, $4;
}
""")


@triton.jit
def _q8_block(qb, dh, INTERP: tl.constexpr):
    """A Q8_0 tile [128, 16] and its rows' d ([4, 8, 1, 1, 1, 2, 1] fp16) -> the [64, 32] fp16 A operand."""
    qb = tl.reshape(qb, (4, 8, 4, 2, 2, 2, 2))
    if INTERP:
        a = (qb.to(tl.int8, bitcast=True).to(tl.float64) * dh.to(tl.float64)).to(tl.float16)
    else:
        a = tl.inline_asm_elementwise(_Q8_DQ, "=r,=r,r,r,r", [qb, tl.broadcast_to(dh, SHAPE7)], dtype=tl.float16,
                                      is_pure=True, pack=4)
    return tl.reshape(tl.permute(a, (0, 5, 1, 3, 4, 2, 6)), (64, 32))


@triton.jit
def _rows(grp):
    """The rows (w, g, x) of row group ``grp`` as [4, 8, 1, 1, 1, 2, 1] int64."""
    w_ = tl.arange(0, 4)[:, None, None, None, None, None, None]
    g_ = tl.arange(0, 8)[None, :, None, None, None, None, None]
    x_ = tl.arange(0, 2)[None, None, None, None, None, :, None]
    return (grp * 64 + 16 * w_ + 8 * x_ + g_).to(tl.int64)


@triton.jit
def _heads(w32_ptr, P1, grp, sb, nsb):
    """Q4_K: row group ``grp``'s super-block ``sb`` heads as four [4, 8, 1, 1, 1, 2, 1] int32 words."""
    hp = w32_ptr + P1 + (_rows(grp) * nsb + sb) * 4
    return tl.load(hp), tl.load(hp + 1), tl.load(hp + 2), tl.load(hp + 3)


@triton.jit
def _q6k_pair(w_ptr, w32_ptr, w16_ptr, P1, P2, grp, j, K, tile, INTERP: tl.constexpr):
    """Q6_K: 128-input pair j of row group ``grp`` -> four [64, 32] fp16 A operands, inputs 128j + 0/32/64/96."""
    base = (grp.to(tl.int64) * (K // 128) + j) * 6144
    hq = tl.load(w_ptr + base + 4096 + tile)
    rows = _rows(grp)
    dh = tl.load(w16_ptr + P2 + rows * (K // 256) + j // 2)
    sp = w32_ptr + P1 + rows * (K // 64) + 2 * j
    a0, a1 = _q6k_chunk(tl.load(w_ptr + base + tile), hq, tl.load(sp), dh, 0, INTERP)
    a2, a3 = _q6k_chunk(tl.load(w_ptr + base + 2048 + tile), hq, tl.load(sp + 1), dh, 1, INTERP)
    return a0, a1, a2, a3


@triton.jit
def _cat(a, b, KA: tl.constexpr):
    """[64, KA] and [64, KA] -> [64, 2 KA]: a then b along K (registers only: the A fragments stay in place)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (64, 2 * KA))


@triton.jit
def _chain(x_ptr, wp, w32p, w16p, p1, p2, lg, k_lo, k_hi, K, rows0, M, stride_xm, tile, WTYPE: tl.constexpr,
           BR: tl.constexpr, IEEE: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr, K64: tl.constexpr = False):
    """One K segment's chain from zero for row group ``lg`` of the weight at ``wp`` (k16 tensor-core steps in k
    order): [64, BR] (swapped) or [BR, 64] fp32."""
    acc = T._zero_acc(BR, 64, SWAP)
    if WTYPE == 8:  # Q8_0: one 32-input block per dot, four per iteration (segments start at multiples of 256)
        rows = _rows(lg)
        for b4 in range(k_lo // 128, k_hi // 128):
            for i in tl.static_range(4):
                b = 4 * b4 + i
                a = _q8_block(tl.load(wp + (lg.to(tl.int64) * (K // 32) + b) * 2048 + tile),
                              tl.load(w16p + p2 + rows * (K // 32) + b), INTERP)
                acc, _a, _b, _c = T._acc(a, x_ptr, rows0, b * 32, acc, acc, acc, acc, M, stride_xm, 1, BR, IEEE, 32, SWAP)
        for b in range(k_hi // 128 * 4, k_hi // 32):  # the last segment's tail (K % 128 != 0)
            a = _q8_block(tl.load(wp + (lg.to(tl.int64) * (K // 32) + b) * 2048 + tile),
                          tl.load(w16p + p2 + rows * (K // 32) + b), INTERP)
            acc, _a, _b, _c = T._acc(a, x_ptr, rows0, b * 32, acc, acc, acc, acc, M, stride_xm, 1, BR, IEEE, 32, SWAP)
    else:
        for sb in range(k_lo // 256, k_hi // 256):
            if WTYPE == 12:  # Q4_K: four 64-input chunks of the super-block
                dm, w1, w2, w3 = _heads(w32p, p1, lg, sb, K // 256)
                for c in tl.static_range(4):
                    lo, hi = _chunk(tl.load(wp + (lg.to(tl.int64) * (K // 64) + sb * 4 + c) * 2048 + tile),
                                    dm, w1, w2, w3, c, INTERP)
                    k0 = sb * 256 + 64 * c
                    if K64 and SWAP:  # one dot: lo's k16 steps then hi's, as the two dots below (decode sizes)
                        acc, _a, _b, _c = T._acc(_cat(lo, hi, 32), x_ptr, rows0, k0, acc, acc, acc, acc, M, stride_xm, 1,
                                                 BR, IEEE, 64, SWAP)
                    else:
                        acc, _a, _b, _c = T._acc(lo, x_ptr, rows0, k0, acc, acc, acc, acc, M, stride_xm, 1, BR, IEEE, 32,
                                                 SWAP)
                        acc, _a, _b, _c = T._acc(hi, x_ptr, rows0, k0 + 32, acc, acc, acc, acc, M, stride_xm, 1, BR, IEEE,
                                                 32, SWAP)
            else:  # Q6_K: two 128-input pairs
                for h in tl.static_range(2):
                    a0, a1, a2, a3 = _q6k_pair(wp, w32p, w16p, p1, p2, lg, 2 * sb + h, K, tile, INTERP)
                    k0 = sb * 256 + 128 * h
                    acc, _a, _b, _c = T._acc(a0, x_ptr, rows0, k0, acc, acc, acc, acc, M, stride_xm, 1, BR, IEEE, 32, SWAP)
                    acc, _a, _b, _c = T._acc(a1, x_ptr, rows0, k0 + 32, acc, acc, acc, acc, M, stride_xm, 1, BR, IEEE, 32, SWAP)
                    acc, _a, _b, _c = T._acc(a2, x_ptr, rows0, k0 + 64, acc, acc, acc, acc, M, stride_xm, 1, BR, IEEE, 32, SWAP)
                    acc, _a, _b, _c = T._acc(a3, x_ptr, rows0, k0 + 96, acc, acc, acc, acc, M, stride_xm, 1, BR, IEEE, 32, SWAP)
    return acc


@triton.jit(do_not_specialize=["M"])
def fragments_kernel(
    x_ptr, w_ptr, w32_ptr, w16_ptr, b_ptr, y_ptr, part_ptr, lock_ptr, M, N, K, stride_xm, stride_ym, P1, P2, KS, NSEG,
    WTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, BR: tl.constexpr, SWAP: tl.constexpr, PARTIAL: tl.constexpr,
    INTERP: tl.constexpr, FUSE_SUM: tl.constexpr = False,
    G1=0, G2=0, O1=0, O2=0, P1B=0, P2B=0, P1C=0, P2C=0, NPARTS: tl.constexpr = 1,
    GDC: tl.constexpr = False, PREFETCH: tl.constexpr = False, WTYPE3: tl.constexpr = 0, K64: tl.constexpr = False,
):
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    if SWAP:  # grid (row groups, token tiles, K segments)
        grp = tl.program_id(0)
        rows0 = tl.program_id(1).to(tl.int64) * BR
        seg_lo = tl.program_id(2)
        seg_hi = seg_lo + 1
    else:  # column-major over (token tiles, row groups): a weight tile is reused while in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BR)
        rows0 = (pid % num_m).to(tl.int64) * BR
        grp = pid // num_m
        seg_lo = 0
        seg_hi = NSEG
    # NPARTS > 1 (fragments_matmul_parts): matrices stacked along N, each at its own address (offsets O1/O2 from
    # the first's in 16-byte units, its heads/scales planes at P1B/P2B, P1C/P2C); row groups G1.. are the second's,
    # G2.. the third's (of type WTYPE3 where it is not 0: Q4_K_M's v). ``lg`` addresses the weight, ``grp`` the
    # output columns and the counters.
    lg = grp
    wp = w_ptr
    w32p = w32_ptr
    w16p = w16_ptr
    p1 = P1
    p2 = P2
    if NPARTS > 1:
        in1 = grp >= G1
        in2 = grp >= G2
        lg = grp - tl.where(in2, G2, tl.where(in1, G1, 0))
        off = tl.where(in2, O2, tl.where(in1, O1, 0)).to(tl.int64)  # in 16-byte units: the loads stay 16-byte aligned
        wp = w_ptr + off * 16
        w32p = w32_ptr + off * 4
        w16p = w16_ptr + off * 8
        p1 = tl.where(in2, P1C, tl.where(in1, P1B, P1))
        p2 = tl.where(in2, P2C, tl.where(in1, P2B, P2))
    if PREFETCH:  # this program's weight bytes, contiguous per row group: (lg K + k) * bytes per input
        BPI: tl.constexpr = 64 if WTYPE == 8 else 32 if WTYPE == 12 else 48  # Q8_0, Q4_K, Q6_K tiles
        w_lo = (lg.to(tl.int64) * K + seg_lo * KS) * BPI
        w_n = (tl.minimum(K, seg_hi * KS) - seg_lo * KS).to(tl.int64) * BPI
        for off in range(0, w_n, 128 * 128):  # a 128-byte line per thread and step
            o = off + tl.arange(0, 128).to(tl.int64) * 128
            pdl.prefetch_l2(wp + w_lo + o, o < w_n)
    pdl.enter(GDC)  # nothing above reads or writes memory a kernel before this one writes
    tile = tl.arange(0, 128)[:, None] * 16 + tl.arange(0, 16)[None, :]
    t = rows0 + tl.arange(0, BR).to(tl.int64)
    total = T._zero_acc(BR, 64, SWAP)
    for seg in range(seg_lo, seg_hi):  # each segment's chain from zero, added in segment order
        k_lo = seg * KS
        k_hi = tl.minimum(K, k_lo + KS)
        if WTYPE3 > 0:  # a mixed group: the third part (row groups G2..) is of type WTYPE3, a uniform branch per program
            if grp >= G2:
                total += _chain(x_ptr, wp, w32p, w16p, p1, p2, lg, k_lo, k_hi, K, rows0, M, stride_xm, tile, WTYPE3, BR,
                                IEEE, SWAP, INTERP, K64)
            else:
                total += _chain(x_ptr, wp, w32p, w16p, p1, p2, lg, k_lo, k_hi, K, rows0, M, stride_xm, tile, WTYPE, BR,
                                IEEE, SWAP, INTERP, K64)
        else:
            total += _chain(x_ptr, wp, w32p, w16p, p1, p2, lg, k_lo, k_hi, K, rows0, M, stride_xm, tile, WTYPE, BR, IEEE,
                            SWAP, INTERP, K64)
    cols = grp * 64 + tl.arange(0, 64)
    if SWAP:
        if PARTIAL:
            offs = (seg_lo.to(tl.int64) * M + t[None, :]) * N + cols[:, None]
            tl.store(part_ptr + offs, total, mask=t[None, :] < M)
            if FUSE_SUM:  # the last segment of this (row group, token tile) to arrive adds them all in order
                lock = lock_ptr + tl.program_id(1) * tl.num_programs(0) + grp
                done = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
                if done == NSEG - 1:
                    acc = tl.zeros((64, BR), dtype=tl.float32)
                    mask = t[None, :] < M
                    for s in range(0, NSEG):  # 0 + p_0 + p_1 + ...: _segments_sum_kernel's additions
                        acc += tl.load(part_ptr + (s * M + t[None, :]) * N + cols[:, None], mask=mask, other=0.0,
                                       cache_modifier=".cg")
                    T._store_rows(y_ptr, b_ptr, tl.trans(acc), t, cols, M, N, stride_ym, HAS_BIAS)
                    tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")  # the counters stay zeroed between launches
        else:
            T._store_rows(y_ptr, b_ptr, tl.trans(total), t, cols, M, N, stride_ym, HAS_BIAS)
    else:
        T._store_rows(y_ptr, b_ptr, total, t, cols, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _dequant_kernel(w_ptr, w32_ptr, w16_ptr, y_ptr, K, P1, P2, WTYPE: tl.constexpr, INTERP: tl.constexpr):
    """y[N, K] fp16: the weight as the matmul multiplies by it; one program per (row group, super-block)."""
    grp = tl.program_id(0)
    sb = tl.program_id(1)
    tile = tl.arange(0, 128)[:, None] * 16 + tl.arange(0, 16)[None, :]
    if WTYPE == 8:  # here sb is a 32-input block
        a = _q8_block(tl.load(w_ptr + (grp.to(tl.int64) * (K // 32) + sb) * 2048 + tile),
                      tl.load(w16_ptr + P2 + _rows(grp) * (K // 32) + sb), INTERP)
        tl.store(y_ptr + (grp * 64 + tl.arange(0, 64)).to(tl.int64)[:, None] * K + sb * 32 + tl.arange(0, 32)[None, :], a)
        return
    yp = y_ptr + (grp * 64 + tl.arange(0, 64)).to(tl.int64)[:, None] * K + sb * 256 + tl.arange(0, 32)[None, :]
    if WTYPE == 12:
        dm, w1, w2, w3 = _heads(w32_ptr, P1, grp, sb, K // 256)
        for c in tl.static_range(4):
            lo, hi = _chunk(tl.load(w_ptr + (grp.to(tl.int64) * (K // 64) + sb * 4 + c) * 2048 + tile), dm, w1, w2, w3,
                            c, INTERP)
            tl.store(yp + 64 * c, lo)
            tl.store(yp + 64 * c + 32, hi)
    else:
        for h in tl.static_range(2):
            a0, a1, a2, a3 = _q6k_pair(w_ptr, w32_ptr, w16_ptr, P1, P2, grp, 2 * sb + h, K, tile, INTERP)
            tl.store(yp + 128 * h, a0)
            tl.store(yp + 128 * h + 32, a1)
            tl.store(yp + 128 * h + 64, a2)
            tl.store(yp + 128 * h + 96, a3)


def _views(w: QWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(bytes, int32 view, fp16 view, P1, P2): the heads (Q4_K) / scales (Q6_K) plane in int32 elements, the
    Q6_K d plane in fp16 elements."""
    raw = w.raw
    w32 = raw[: raw.numel() // 4 * 4].view(torch.int32)
    w16 = raw[: raw.numel() // 2 * 2].view(torch.int16).view(torch.float16)
    if w.ggml_type == GGMLType.Q4_K:
        return raw, w32, w16, w.n * w.k // 8, 0
    if w.ggml_type == GGMLType.Q8_0:
        return raw, w32, w16, 0, w.n * w.k // 2
    nt = w.n * w.k * 3 // 4
    return raw, w32, w16, nt // 4, (nt + w.n * w.k // 16) // 2


def fragments_matmul(x: torch.Tensor, w: QWeight, bias: torch.Tensor | None, out: torch.Tensor,
                     swap: bool | None = None, br: int | None = None, warps: int = 4,
                     stages: int | None = None) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W[N, K].T (+ bias) for a Q4_K/Q6_K/Q8_0 weight in fragment order (fp16 x; qmatmul
    checked the shapes). ``swap`` (default M <= SWAP_MAX_M): the weight as the wgmma A operand; ``br``: tokens
    per program; ``stages`` (default ``swap_stages``): the swapped form's pipeline depth."""
    v.check(w.fragments and w.raw.data_ptr() % 16 == 0, KERNEL, "w", "a 16-byte aligned weight in fragment order")
    M = x.shape[0]
    swap = M <= T.SWAP_MAX_M if swap is None else swap
    interp = x.device.type == "cpu"
    if br is None:
        br = swap_br(M) if swap else (64 if interp or M < 128 else 128)
    ks, nseg = T.k_segments(w.n, w.k)
    stages = swap_stages(w.ggml_type, ks, M) if stages is None else stages
    partial = swap and nseg > 1
    part = torch.empty((nseg, M, w.n), dtype=torch.float32, device=x.device) if partial else out
    raw, w32, w16, p1, p2 = _views(w)
    grid: tuple[int, ...] = (w.n // ROWS, triton.cdiv(M, br), nseg) if swap else (triton.cdiv(M, br) * (w.n // ROWS),)
    # the segments' sum inside the launch: the weight's own zeroed counters, one per (row group, token tile)
    fuse = (partial and M <= FUSE_MAX_M and w.locks is not None
            and w.locks.numel() >= (w.n // ROWS) * triton.cdiv(M, br))
    fragments_kernel[grid](
        x, raw, w32, w16, bias if bias is not None else out, out, part, w.locks if fuse else out, M, w.n, w.k,
        x.stride(0), out.stride(0), p1, p2, ks, nseg, WTYPE=int(w.ggml_type), HAS_BIAS=bias is not None, BR=br,
        SWAP=swap, PARTIAL=partial, INTERP=interp, FUSE_SUM=fuse, K64=DOT_K == 64,
        num_warps=warps, num_stages=stages if swap else 2, enable_fp_fusion=False,
        **pdl.prefetch_opts(x),
    )
    if partial and not fuse:
        T._segments_sum_kernel[(triton.cdiv(M * w.n, T.SUM_BLOCK),)](
            part, bias if bias is not None else out, out, M, w.n, nseg, out.stride(0),
            HAS_BIAS=bias is not None, BLOCK=T.SUM_BLOCK, num_warps=4,
            **pdl.opts(part),
        )
    return out


def parts_fit(parts: tuple[QWeight, ...], M: int) -> bool:
    """Whether ``fragments_matmul_parts`` takes these stacked matrices in one launch: 2-3 in fragment order, one K
    and the same K segments (else their rows would differ from their own launches'), decode sizes, of one type --
    or, with ``MIXED_PARTS``, a third of another (Q4_K_M's q, k in Q4_K and v in Q6_K)."""
    if not 2 <= len(parts) <= 3 or M > T.SWAP_MAX_M:
        return False
    p0 = parts[0]
    segs = T.k_segments(p0.n, p0.k)
    same = parts if len(parts) == 2 or not MIXED_PARTS else parts[:2]
    return (all(p.ggml_type == p0.ggml_type and p.half2 == p0.half2 for p in same)
            and all(p.fragments and p.k == p0.k and p.raw.data_ptr() % 16 == 0 and p.raw.device == p0.raw.device
                    and T.k_segments(p.n, p.k) == segs for p in parts))


def fragments_matmul_parts(x: torch.Tensor, parts: tuple[QWeight, ...], bias: torch.Tensor | None, out: torch.Tensor,
                           locks: torch.Tensor | None = None) -> torch.Tensor:
    """out[M, sum N] = x @ [W_0; W_1; W_2].T (+ bias) in one swapped launch (``parts_fit``), each part's rows bit
    for bit its own ``fragments_matmul``'s (why: a small model's q/k/v are three short launches per layer).
    ``locks``: zeroed int32 counters, at least (sum N / 64) * token tiles, for the in-launch segment sum."""
    M = x.shape[0]
    v.check(parts_fit(parts, M), KERNEL, "parts", "2-3 same-type fragment-order matrices (a third may differ), one K "
            f"and K segments, M <= {T.SWAP_MAX_M}")
    n = sum(p.n for p in parts)
    v.check(tuple(out.shape) == (M, n) and out.stride(1) == 1, KERNEL, "out", f"must be [{M}, {n}] with unit column stride")
    p0 = parts[0]
    br = swap_br(M)
    ks, nseg = T.k_segments(p0.n, p0.k)
    partial = nseg > 1
    part = torch.empty((nseg, M, n), dtype=torch.float32, device=x.device) if partial else out
    views = [_views(p) for p in parts]
    raw, w32, w16, p1, p2 = views[0]
    groups = n // ROWS
    fuse = (partial and M <= FUSE_MAX_M and locks is not None and locks.numel() >= groups * triton.cdiv(M, br))
    g1 = parts[0].n // ROWS
    g2 = g1 + (parts[1].n // ROWS if len(parts) == 3 else 1 << 30)  # no third part: never reached
    offs = [(p.raw.data_ptr() - p0.raw.data_ptr()) // 16 for p in parts] + [0]  # exact: every part 16-byte aligned
    pb = views[1][3:] if len(parts) > 1 else (0, 0)
    pc = views[2][3:] if len(parts) > 2 else (0, 0)
    mixed = parts[-1].ggml_type != p0.ggml_type
    fragments_kernel[(groups, triton.cdiv(M, br), nseg)](
        x, raw, w32, w16, bias if bias is not None else out, out, part, locks if fuse else out, M, n, p0.k,
        x.stride(0), out.stride(0), p1, p2, ks, nseg, WTYPE=int(p0.ggml_type), HAS_BIAS=bias is not None, BR=br,
        SWAP=True, PARTIAL=partial, INTERP=x.device.type == "cpu", FUSE_SUM=fuse, K64=DOT_K == 64,
        G1=g1, G2=g2, O1=offs[1], O2=offs[2], P1B=pb[0], P2B=pb[1], P1C=pc[0], P2C=pc[1], NPARTS=len(parts),
        WTYPE3=int(parts[-1].ggml_type) if mixed else 0, num_warps=4, num_stages=swap_stages(p0.ggml_type, ks, M),
        enable_fp_fusion=False,
        **(pdl.opts(x) if mixed else pdl.prefetch_opts(x)),  # the prefetch sizes one type's tiles
    )
    if partial and not fuse:
        T._segments_sum_kernel[(triton.cdiv(M * n, T.SUM_BLOCK),)](
            part, bias if bias is not None else out, out, M, n, nseg, out.stride(0),
            HAS_BIAS=bias is not None, BLOCK=T.SUM_BLOCK, num_warps=4,
            **pdl.opts(part),
        )
    return out


def fragments_dequant(w: QWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] fp16: the values the matmul multiplies by (Q4_K/Q6_K: ``half2_weight``'s; Q8_0: ggml's rounded
    once), computed by the matmul's own code (the prefill scratch)."""
    y = out if out is not None else torch.empty(w.n, w.k, dtype=torch.float16, device=w.raw.device)
    v.check(y.shape == (w.n, w.k) and y.dtype == torch.float16 and y.is_contiguous(), KERNEL, "out",
            f"must be a contiguous fp16 [{w.n}, {w.k}]")
    raw, w32, w16, p1, p2 = _views(w)
    blocks = w.k // (32 if w.ggml_type == GGMLType.Q8_0 else 256)
    _dequant_kernel[(w.n // ROWS, blocks)](raw, w32, w16, y, w.k, p1, p2, WTYPE=int(w.ggml_type),
                                                INTERP=w.raw.device.type == "cpu", num_warps=4, enable_fp_fusion=False)
    return y
