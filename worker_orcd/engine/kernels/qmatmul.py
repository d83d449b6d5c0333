"""y = x · Wᵀ with W resident as GGUF blocks, dequantized in registers: one batch-invariant kernel.

Every M (1-token decode through prefill chunks) runs the SAME arithmetic per
output element, so a row's result is bitwise independent of the batch size
and of where the row sits in it (the batching engine depends on this):

* fixed reduction: BLOCK_K = 256 inputs (one K-quant super-block, eight
  32-blocks), no split-K, no atomics; what varies with M (``launch_config``:
  output columns per program, warps, pipelining) never touches a row's sums;
* the unit of work is one ``tl.dot(x[16, 256], Wᵀ[256, 32], acc)``: 16 rows of
  x against one dequantized weight tile, accumulating into acc in place
  (``acc`` is passed to ``tl.dot``, so the tensor-core chain continues from it:
  the reduction order is k = 0, 16, 32, ... for every row, set by K alone);
* a program handles GROUP_M (1, 2 or 4) such 16-row units that share the
  dequantized tile: GROUP_M only says how many identical, independent dots
  reuse one dequantization (decode: 1, no wasted work; prefill: 4, the weight
  is dequantized 4x less often). A 16-row dot always lowers to the same
  ``mma.sync m16n8k16`` sequence (never Hopper's wgmma, which needs 64-row
  operands), so the per-element arithmetic is identical for every GROUP_M;
* ``M`` is not specialised on (``do_not_specialize``): the same binary runs
  for every M; padding rows (masked loads of 0) cannot touch real rows.

The weight tile is dequantized to fp32 with ggml's operation order (the
dequant kernels' helpers, ``enable_fp_fusion=False`` so no FMA contraction),
then rounded once to the activation dtype: exactly the fp16/bf16 weight values
the dequantize-at-load engine held. Accumulation is fp32; the epilogue adds
the bias in fp32 and rounds once to the output dtype (fp32 for logits).
fp32 activations (CPU interpreter tests) use IEEE fp32 dots, not TF32.

Decode reads each weight byte once (one program per 32 output features; the
few bytes of a block's scales are re-read from L1). No cuBLAS here: it picks
its algorithm by M and is not batch invariant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...gguf.constants import GGMLType
from ..dequant.kernels_basic import _fifth_bit, _nibble, _round_bf16, load_f16
from ..dequant.kernels_k import _k_low_nibble, _scale_min_k4
from ..qweight import FUSED_TYPES, QWeight, WeightGroup
from . import validate as v

KERNEL = "qmatmul"
BLOCK_M = 16  # rows per dot (the invariant unit)
BLOCK_N = 32
BLOCK_K = 256
NUM_WARPS = 4


def group_m(m: int) -> int:
    """16-row dots per program sharing one dequantized tile (does not change any row's arithmetic)."""
    return 1 if m <= 16 else 2 if m <= 32 else 4


def launch_config(m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, num_warps, num_stages, GROUP_M) for an [m, K] x [K, n] product.

    Only what leaves every output element's arithmetic unchanged varies (output columns per
    program, warps, pipelining depth, dots sharing a tile); BLOCK_K, the 16-row dot and the K
    order never do. Picked from benchmarks/tune_qmatmul.py on the H200, where every candidate
    gave bit-identical outputs and these were fastest (small M: more, narrower programs).
    """
    if m <= 16:
        if n >= 65_536:
            return 64, 4, 2, 1
        return (32, 4, 3, 1) if n >= 8192 else (16, 2, 4, 1)
    if m <= 64:
        return (64, 4, 2, group_m(m)) if n >= 65_536 else (32, 4, 4, group_m(m))
    return (64, 4, 2, 4) if n >= 2048 else (32, 4, 2, 4)


_FLOAT_VIEW = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.int16}


@triton.jit
def _dequant_tile(w_ptr, n, k, mask, K, RB, WTYPE: tl.constexpr):
    """fp32 values of W[n, k] for a [BN, BK] tile; ``RB`` = bytes per row (block types)."""
    if WTYPE == 0:  # F32
        x = tl.load(w_ptr + n * K + k, mask=mask, other=0.0)
    elif WTYPE == 1:  # F16
        x = tl.load(w_ptr + n * K + k, mask=mask, other=0.0).to(tl.float32)
    elif WTYPE == 30:  # BF16 as int16 bits
        bits = tl.load(w_ptr + n * K + k, mask=mask, other=0).to(tl.int32)
        x = (bits << 16).to(tl.float32, bitcast=True)
    elif WTYPE == 8:  # Q8_0 {f16 d; i8 qs[32]}
        base = n * RB + (k // 32) * 34
        d = load_f16(w_ptr, base, mask)
        q = tl.load(w_ptr + base + 2 + k % 32, mask=mask, other=0).to(tl.int8, bitcast=True)
        x = q.to(tl.float32) * d
    elif WTYPE == 2:  # Q4_0 {f16 d; u8 qs[16]}
        base = n * RB + (k // 32) * 18
        d = load_f16(w_ptr, base, mask)
        q = _nibble(w_ptr, base + 2, k % 32, mask) - 8
        x = d * q.to(tl.float32)
    elif WTYPE == 3:  # Q4_1 {f16 d; f16 m; u8 qs[16]}
        base = n * RB + (k // 32) * 20
        d = load_f16(w_ptr, base, mask)
        m = load_f16(w_ptr, base + 2, mask)
        q = _nibble(w_ptr, base + 4, k % 32, mask)
        x = d * q.to(tl.float32) + m
    elif WTYPE == 6:  # Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}
        base = n * RB + (k // 32) * 22
        d = load_f16(w_ptr, base, mask)
        j = k % 32
        q = (_nibble(w_ptr, base + 6, j, mask) | _fifth_bit(w_ptr, base + 2, j, mask)) - 16
        x = d * q.to(tl.float32)
    elif WTYPE == 7:  # Q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}
        base = n * RB + (k // 32) * 24
        d = load_f16(w_ptr, base, mask)
        m = load_f16(w_ptr, base + 2, mask)
        j = k % 32
        q = _nibble(w_ptr, base + 8, j, mask) | _fifth_bit(w_ptr, base + 4, j, mask)
        x = d * q.to(tl.float32) + m
    elif WTYPE == 12:  # Q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}
        base = n * RB + (k // 256) * 144
        j = k % 256
        s = j // 32
        d = load_f16(w_ptr, base, mask)
        dmin = load_f16(w_ptr, base + 2, mask)
        sc, mn = _scale_min_k4(w_ptr, base + 4, s, mask)
        q = _k_low_nibble(w_ptr, base + 16, s, j % 32, mask).to(tl.float32)
        x = (d * sc) * q - dmin * mn
    elif WTYPE == 13:  # Q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}
        base = n * RB + (k // 256) * 176
        j = k % 256
        s = j // 32
        lane = j % 32
        d = load_f16(w_ptr, base, mask)
        dmin = load_f16(w_ptr, base + 2, mask)
        sc, mn = _scale_min_k4(w_ptr, base + 4, s, mask)
        qh = tl.load(w_ptr + base + 16 + lane, mask=mask, other=0).to(tl.int32)
        q = _k_low_nibble(w_ptr, base + 48, s, lane, mask) | (((qh >> s) & 1) << 4)
        x = (d * sc) * q.to(tl.float32) - dmin * mn
    else:  # Q6_K (14) {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}
        base = n * RB + (k // 256) * 210
        j = k % 256
        half = j // 128
        ql = tl.load(w_ptr + base + half * 64 + (j % 64), mask=mask, other=0).to(tl.int32)
        qh = tl.load(w_ptr + base + 128 + half * 32 + (j % 32), mask=mask, other=0).to(tl.int32)
        low = (ql >> (((j // 64) % 2) * 4)) & 0x0F
        high = (qh >> (((j // 32) % 4) * 2)) & 0x03
        q = ((low | (high << 4)) - 32).to(tl.float32)
        scale = tl.load(w_ptr + base + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        d = load_f16(w_ptr, base + 208, mask)
        x = (d * scale) * q
    return tl.where(mask, x, 0.0)


@triton.jit
def _x_rows(x_ptr, rows, k, M, K, stride_xm):
    mask = (rows[:, None] < M) & (k[None, :] < K)
    return tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)


@triton.jit
def _dot(xt, wt, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(xt, wt, acc, input_precision="ieee")
    return tl.dot(xt, wt, acc)


@triton.jit
def _store_rows(y_ptr, b_ptr, acc, rows, cols, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * stride_ym + cols[None, :]
    if y_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(y_ptr + offs, _round_bf16(acc), mask=mask)
    else:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def qmatmul_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    RB,
    WTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_M: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m0 = tl.program_id(1).to(tl.int64) * (GROUP_M * BM)
    cols = pid_n * BN + tl.arange(0, BN)
    n = cols.to(tl.int64)[:, None]
    r = tl.arange(0, BM).to(tl.int64)
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    acc0 = tl.zeros((BM, BN), dtype=tl.float32)
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        wmask = (n < N) & (kk[None, :] < K)
        w = _dequant_tile(w_ptr, n, kk.to(tl.int64)[None, :], wmask, K, RB, WTYPE)
        if x_ptr.dtype.element_ty == tl.bfloat16:
            wt = tl.trans(_round_bf16(w))
        else:
            wt = tl.trans(w.to(x_ptr.dtype.element_ty))
        acc0 = _dot(_x_rows(x_ptr, m0 + r, kk, M, K, stride_xm), wt, acc0, IEEE)
        if GROUP_M > 1:
            acc1 = _dot(_x_rows(x_ptr, m0 + BM + r, kk, M, K, stride_xm), wt, acc1, IEEE)
        if GROUP_M > 2:
            acc2 = _dot(_x_rows(x_ptr, m0 + 2 * BM + r, kk, M, K, stride_xm), wt, acc2, IEEE)
            acc3 = _dot(_x_rows(x_ptr, m0 + 3 * BM + r, kk, M, K, stride_xm), wt, acc3, IEEE)
    _store_rows(y_ptr, b_ptr, acc0, m0 + r, cols, M, N, stride_ym, HAS_BIAS)
    if GROUP_M > 1:
        _store_rows(y_ptr, b_ptr, acc1, m0 + BM + r, cols, M, N, stride_ym, HAS_BIAS)
    if GROUP_M > 2:
        _store_rows(y_ptr, b_ptr, acc2, m0 + 2 * BM + r, cols, M, N, stride_ym, HAS_BIAS)
        _store_rows(y_ptr, b_ptr, acc3, m0 + 3 * BM + r, cols, M, N, stride_ym, HAS_BIAS)


def _check(x: torch.Tensor, w: QWeight, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    v.tensor(KERNEL, "x", x)
    v.rank(KERNEL, "x", x, 2)
    v.dtype(KERNEL, "x", x, v.FLOAT_DTYPES)
    v.check(x.stride(-1) == 1, KERNEL, "x", "rows must have unit stride")
    v.check(x.shape[0] >= 1, KERNEL, "x", "needs at least one row")
    v.check(isinstance(w, QWeight), KERNEL, "w", f"must be a QWeight, got {type(w).__name__}")
    v.check(w.ggml_type in FUSED_TYPES, KERNEL, "w", f"type {w.ggml_type.name} has no fused kernel")
    v.check(x.shape[1] == w.k, KERNEL, "x", f"must have K = {w.k} columns (the weight's), got {x.shape[1]}")
    v.check(w.raw.device == x.device, KERNEL, "w", f"must be on {x.device}, got {w.raw.device}")
    v.rank(KERNEL, "out", out, 2)
    v.check(out.device == x.device, KERNEL, "out", f"must be on {x.device}")
    v.check(
        tuple(out.shape) == (x.shape[0], w.n), KERNEL, "out", f"must have shape {(x.shape[0], w.n)}, got {tuple(out.shape)}"
    )
    v.check(out.stride(-1) == 1, KERNEL, "out", "rows must have unit stride")
    v.dtype(KERNEL, "out", out, v.FLOAT_DTYPES)
    if bias is not None:
        v.check(tuple(bias.shape) == (w.n,) and bias.device == x.device, KERNEL, "bias", f"must be [{w.n}] on {x.device}")
    if x.device.type == "cpu":
        v.check(v.TRITON_INTERPRETED, KERNEL, "x", "CPU tensors need TRITON_INTERPRET=1")
    v.check(w.raw.numel() < 2**62 and x.shape[0] * max(x.stride(0), out.stride(0)) < 2**62, KERNEL, "x", "too large")


def qmatmul(
    x: torch.Tensor,
    w: QWeight,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x[M, K] @ W[N, K].T (+ bias) -> [M, N] in ``out_dtype`` (default x's); ``out`` may be a column slice.

    Q4_K/Q5_K, and Q8_0/Q6_K/Q4_0/Q4_1/Q5_0/Q5_1 in ``qlayout``'s planes, go to ``qmatmul_tiled``."""
    if out is None:
        v.tensor(KERNEL, "x", x)
        v.rank(KERNEL, "x", x, 2)
        out = torch.empty(x.shape[0], getattr(w, "n", 0), dtype=out_dtype or x.dtype, device=x.device)
    _check(x, w, bias, out)
    if tiled.supports(w):
        if x.device.type == "cuda" and x.shape[0] >= prefill.PREFILL_MIN_M:
            return prefill.qmatmul_dequant(x, w, bias, out)  # the same rows, through the dense kernel
        return tiled.qmatmul_tiled(x, w, bias, out)
    v.check(not w.planar, KERNEL, "w", f"planar {w.ggml_type.name} runs only in qmatmul_tiled")
    M = x.shape[0]
    bn, warps, stages, gm = launch_config(M, w.n) if x.device.type == "cuda" else (BLOCK_N, NUM_WARPS, 1, group_m(M))
    src = w.raw.view(_FLOAT_VIEW[w.ggml_type]) if w.ggml_type in _FLOAT_VIEW else w.raw
    grid = (triton.cdiv(w.n, bn), triton.cdiv(M, gm * BLOCK_M))
    qmatmul_kernel[grid](
        x,
        src,
        bias if bias is not None else out,
        out,
        M,
        w.n,
        w.k,
        x.stride(0),
        out.stride(0),
        w.row_bytes,
        WTYPE=int(w.ggml_type),
        HAS_BIAS=bias is not None,
        GROUP_M=gm,
        BM=BLOCK_M,
        BN=bn,
        BK=BLOCK_K,
        num_warps=warps,
        num_stages=stages,
        enable_fp_fusion=False,
    )
    return out


def qlinear(
    x: torch.Tensor, w: QWeight | WeightGroup, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``qmatmul`` over a weight or a mixed-type group: one launch per part, each into its columns."""
    parts = w.parts if isinstance(w, WeightGroup) else (w,)
    n_total = sum(p.n for p in parts)
    v.tensor(KERNEL, "x", x)
    v.rank(KERNEL, "x", x, 2)
    out = torch.empty(x.shape[0], n_total, dtype=out_dtype or x.dtype, device=x.device)
    if bias is not None:
        v.check(tuple(bias.shape) == (n_total,), KERNEL, "bias", f"must be [{n_total}], got {tuple(bias.shape)}")
    off = i = lock_at = 0
    M = x.shape[0]
    while i < len(parts):
        run = parts[i : i + 1]
        if isinstance(w, WeightGroup) and x.dtype == torch.float16 and M <= fragments.PARTS_MAX_M:
            # the longest run (<= 3) one launch takes
            for j in (3, 2):
                if fragments.parts_fit(parts[i : i + j], M) and len(parts[i : i + j]) == j:
                    run = parts[i : i + j]
                    break
        n = sum(p.n for p in run)
        b = None if bias is None else bias[off : off + n]
        locks_n = sum(p.locks.numel() for p in run if p.locks is not None)
        if len(run) > 1:
            locks = None if w.locks is None else w.locks[lock_at : lock_at + locks_n]  # type: ignore[union-attr]
            fragments.fragments_matmul_parts(x, run, b, out[:, off : off + n], locks)
        else:
            qmatmul(x, run[0], b, out=out[:, off : off + n])
        off += n
        lock_at += locks_n
        i += len(run)
    return out


def qmatmul_reference(x: torch.Tensor, w: QWeight | WeightGroup, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64: x @ dequantize(W).T (+ bias), the weight first rounded to x's dtype like the kernel."""
    wd = w.dequantize(torch.float32).to(x.dtype).double()
    y = x.double() @ wd.t()
    return y if bias is None else y + bias.double()


from . import fragments  # noqa: E402  (the stacked parts' launch)
from . import qmatmul_tiled as tiled  # noqa: E402  (it imports this module's dot and epilogue)
from . import qmatmul_prefill as prefill  # noqa: E402
