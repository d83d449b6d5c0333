"""y = x · Wᵀ for float weights (F16/BF16/F32): the batch-invariant matmul of the dense residency.

Why not qmatmul's float path: it dequantizes each weight tile through fp32
registers, so the loads cannot be pipelined into shared memory and a decode
step reaches 0.1–2.4 TB/s (latency-bound on small matrices). Here the weight
tile is loaded in its own dtype by pipelined loads, and small matrices are
split along K so that enough programs stream them at once.

What makes a row's result independent of M (batch invariance):

* the unit of work is one ``tl.dot(x[16, BK], Wᵀ[BK, BN], acc)`` (``mma.sync
  m16n8k16``, never Hopper's 64-row wgmma), chained into ``acc`` in k order
  k = k_lo, k_lo + 16, ...: BK, BN, warps and stages do not change a sum;
* the K split is fixed per weight shape (``split_k(n, k)``, never per M): each
  split's fp32 partial is written to a workspace, and the last program of a
  column tile to finish (an acq_rel counter) adds the partials in split order
  0, 1, ..., S-1 and writes the output. Which program reduces varies; the
  arithmetic does not. The counter is reset by that program, so a launch
  leaves the lock buffer zeroed (the buffer belongs to the model, SPEC 4013);
* programs split M in groups of 1/2/4 dots sharing one weight tile (as
  qmatmul); with a K split, at most MAX_ROW_PROGRAMS programs along M, each
  looping over its groups, so the counters needed do not grow with M.

Wide tiles (``wide_config``): from WIDE_MIN_M rows, an unsplit shape runs one
``tl.dot`` over a 64/128-row tile (Hopper's wgmma, 3-4x the 16-row rate). Its
chain is the same k = 0, 16, 32, ... with fp32 accumulation; that the hardware
gives the same bits for a row through wgmma as through m16n8k16 is not
documented, so it is measured: tests/test_dense_matmul.py compares every real
shape's rows across the switch on the GPU, benchmarks/tune_wide.py per config.

Weights and activations share one dtype (the dense residency's); fp32 (CPU
interpreter tests) uses IEEE dots. The bias is added in
fp32 once, after the (ordered) reduction; one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from . import validate as v
from .qmatmul import _dot, _store_rows as _store  # the same 16-row dot and epilogue as qmatmul

KERNEL = "dense_matmul"
BM = 16  # rows per dot (the invariant unit)
BK_SPLIT = 128  # K split boundaries are multiples of this (every BK candidate divides it)
MAX_SPLIT = 8
MAX_ROW_PROGRAMS = 16  # with a split, programs along M (each loops over its share of 64-row groups)
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)


def split_k(n: int, k: int) -> int:
    """K splits for an [n, k] weight: a function of the shape only (never of M).

    Only narrow, deep matrices (a small model's FFN down projection: 28 column tiles on 132
    SMs) gain at decode; on the H200 a split cost more than it saved at M >= 64 for every
    7B matrix (benchmarks/tune_dense.py, RESULTS.md).
    """
    if n > 2048 or k < 2048:
        return 1
    return 4 if k >= 4096 else 2


def split_size(k: int, splits: int) -> int:
    """Inputs per split: k / splits rounded up to a multiple of BK_SPLIT."""
    per = -(-k // splits)
    return -(-per // BK_SPLIT) * BK_SPLIT


def lock_slots(n: int) -> int:
    """Counters one [n, k] launch may use (column tiles of at least 16, up to MAX_ROW_PROGRAMS)."""
    return MAX_ROW_PROGRAMS * -(-n // 16)


def group_m(m: int) -> int:
    return 1 if m <= 16 else 2 if m <= 32 else 4


def launch_config(m: int, n: int, splits: int) -> tuple[int, int, int, int, int]:
    """(BN, BK, num_warps, num_stages, GROUP_M); none of them changes a row's arithmetic.

    The fastest bit-identical candidates of benchmarks/tune_dense.py on the H200 (0.5B and 7B
    shapes, M = 1/16/64/512; every one of ~14 candidates per case gave identical rows).
    """
    gm = group_m(m)
    if splits > 1:
        return 32, 128, 4, 5, gm
    if m <= 16:
        if n >= 65_536:
            return 64, 128, 4, 4, 1
        if n >= 16_384:
            return 64, 64, 4, 3, 1
        if n >= 8192:
            return 32, 128, 4, 3, 1
        return (32, 128, 4, 5, 1) if n >= 2048 else (16, 128, 4, 5, 1)
    if m <= 64:
        return (64, 64, 4, 3, gm) if 16_384 <= n < 65_536 else (64, 128, 4, 3, gm)
    return (64, 64, 4, 3, 4) if 2048 <= n < 65_536 else (64, 128, 4, 3, 4)


# the quantized prefill's segmented chains as one software-pipelined loop: a 7B Q4_K_M 512-token step 32.8 -> 27.2
# ms against a loop per segment (short segments leave a pipeline nothing to overlap); bitwise equal (probe_prefill.py)
SEG_FLAT = True
WIDE_MIN_M = 17  # rows from which an unsplit shape takes the wide tile


def wide_config(m: int, n: int, splits: int) -> tuple[int, int, int, int, int] | None:
    """(BM, BN, BK, num_warps, num_stages) of the wide-tile kernel, or None for the 16-row kernel.

    benchmarks/tune_wide.py on the H200 (every candidate's rows bitwise equal to the 16-row
    kernel's; 0.5B/7B shapes, M = 16..1024): 128x128 tiles once there are >= 100 of them from
    M = 128; below, one 64-row tile from 17 rows (at 16 the 16-row kernel is faster; at 24-64
    the wide one, up to 1.5x on narrow matrices) with the column width that keeps the SMs busy:
    32 columns x 128 inputs for narrow matrices (qkv, o, down), 128 x 64 for a 7B's gate_up,
    64/128 x 64 for an output head.
    """
    if splits > 1 or m < WIDE_MIN_M:
        return None
    if m >= 128:
        return (128, 128, 64, 8, 3) if -(-m // 128) * -(-n // 128) >= 100 else (64, 64, 64, 4, 4)
    if n >= 65_536:  # an output head
        return (64, 64, 64, 4, 4) if m <= 32 else (64, 128, 64, 4, 3) if m < 96 else (128, 128, 64, 8, 3)
    if n >= 16_384:  # a 7B's gate_up
        return (64, 128, 64, 4, 3) if m < 96 else (64, 64, 64, 4, 4)
    if n >= 8192:  # a 0.5B's gate_up
        return 64, 64, 64, 4, 4
    return 64, 32, 128, 4, 3


@triton.jit
def _chain(xp, wp, rmask, cmask, kk, k_lo, k_hi, acc, EVEN: tl.constexpr, IEEE: tl.constexpr, BK: tl.constexpr):
    """``acc`` + the dot chain of x[:, k_lo:k_hi] · W[:, k_lo:k_hi]ᵀ in k order (BK at a time; EVEN: no
    masks, k_hi - k_lo a multiple of BK); the pointers come back advanced past it."""
    for k0 in range(k_lo, k_hi, BK):
        if EVEN:
            xt = tl.load(xp, mask=rmask, other=0.0)
            w = tl.load(wp, mask=cmask, other=0.0)
        else:
            km = (k0 + kk)[None, :] < k_hi
            xt = tl.load(xp, mask=rmask & km, other=0.0)
            w = tl.load(wp, mask=cmask & km, other=0.0)
        acc = _dot(xt, tl.trans(w), acc, IEEE)
        xp += BK
        wp += BK
    return acc, xp, wp


@triton.jit(do_not_specialize=["M"])
def dense_matmul_wide_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, K_SEG,
    HAS_BIAS: tl.constexpr, BMw: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
    SEGMENTED: tl.constexpr, SEG_FLAT: tl.constexpr = False,
    GDC: tl.constexpr = False,
):
    pdl.enter(GDC)
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    # column-major program order over (row tile, column tile): a weight tile is reused by
    # consecutive row tiles while it is in L2 (order changes no arithmetic)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BMw)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rows = pid_m * BMw + tl.arange(0, BMw)
    cols = pid_n * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    xp = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + kk[None, :]
    wp = w_ptr + cols.to(tl.int64)[:, None] * K + kk[None, :]
    rmask = rows[:, None] < M
    cmask = cols[:, None] < N
    acc = tl.zeros((BMw, BN), dtype=tl.float32)
    if SEGMENTED and SEG_FLAT:
        # the same sums in one software-pipelined loop: the chain restarts from zero at each segment's
        # end (EVEN_K: K and K_SEG multiples of BK; 0 + part is part bit for bit, a chain from +0 is never -0)
        part = tl.zeros((BMw, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            xt = tl.load(xp, mask=rmask, other=0.0)
            w = tl.load(wp, mask=cmask, other=0.0)
            part = _dot(xt, tl.trans(w), part, IEEE)
            xp += BK
            wp += BK
            if ((k0 + BK) % K_SEG == 0) | (k0 + BK == K):
                acc = acc + part
                part = tl.zeros((BMw, BN), dtype=tl.float32)
    elif SEGMENTED:
        # the quantized weights' K segments (qmatmul_tiled.k_segments): a chain per segment from
        # zero, the chains added in segment order -- the fused kernel's sum (K_SEG % BK == 0)
        for lo in range(0, K, K_SEG):
            hi = tl.minimum(K, lo + K_SEG)
            part, xp, wp = _chain(xp, wp, rmask, cmask, kk, lo, hi, tl.zeros((BMw, BN), dtype=tl.float32),
                                  EVEN_K, IEEE, BK)
            if lo == 0:
                acc = part
            else:
                acc = acc + part
    else:
        acc, xp, wp = _chain(xp, wp, rmask, cmask, kk, 0, K, acc, EVEN_K, IEEE, BK)
    _store(y_ptr, b_ptr, acc, rows, cols, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _rows_x_tile(x_ptr, w_ptr, m0, cols, k_lo, k_hi, M, N, K, stride_xm,
                 GROUP: tl.constexpr, BMc: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """GROUP 16-row accumulators of x[m0 : m0 + 16*GROUP, k_lo:k_hi] · W[cols, k_lo:k_hi]ᵀ."""
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    r = tl.arange(0, BMc).to(tl.int64)
    n = cols.to(tl.int64)
    acc0 = tl.zeros((BMc, BN), dtype=tl.float32)
    acc1 = tl.zeros((BMc, BN), dtype=tl.float32)
    acc2 = tl.zeros((BMc, BN), dtype=tl.float32)
    acc3 = tl.zeros((BMc, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kk = (k0 + tl.arange(0, BK)).to(tl.int64)
        kmask = kk[None, :] < k_hi
        w = tl.load(w_ptr + n[:, None] * K + kk[None, :], mask=(n[:, None] < N) & kmask, other=0.0)
        wt = tl.trans(w)
        rows = m0 + r
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=(rows[:, None] < M) & kmask, other=0.0)
        acc0 = _dot(xt, wt, acc0, IEEE)
        if GROUP > 1:
            rows = m0 + BMc + r
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=(rows[:, None] < M) & kmask, other=0.0)
            acc1 = _dot(xt, wt, acc1, IEEE)
        if GROUP > 2:
            rows = m0 + 2 * BMc + r
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=(rows[:, None] < M) & kmask, other=0.0)
            acc2 = _dot(xt, wt, acc2, IEEE)
            rows = m0 + 3 * BMc + r
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=(rows[:, None] < M) & kmask, other=0.0)
            acc3 = _dot(xt, wt, acc3, IEEE)
    return acc0, acc1, acc2, acc3


@triton.jit(do_not_specialize=["M"])
def dense_matmul_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym, K_SPLIT,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, GROUP_M: tl.constexpr,
    BMc: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GDC: tl.constexpr = False,
):
    pdl.enter(GDC)
    pid_n = tl.program_id(0)
    cols = pid_n * BN + tl.arange(0, BN)
    r = tl.arange(0, BMc)
    if SPLIT == 1:
        m0 = tl.program_id(1) * (GROUP_M * BMc)
        a0, a1, a2, a3 = _rows_x_tile(x_ptr, w_ptr, m0, cols, 0, K, M, N, K, stride_xm, GROUP_M, BMc, BN, BK)
        _store(y_ptr, b_ptr, a0, m0 + r, cols, M, N, stride_ym, HAS_BIAS)
        if GROUP_M > 1:
            _store(y_ptr, b_ptr, a1, m0 + BMc + r, cols, M, N, stride_ym, HAS_BIAS)
        if GROUP_M > 2:
            _store(y_ptr, b_ptr, a2, m0 + 2 * BMc + r, cols, M, N, stride_ym, HAS_BIAS)
            _store(y_ptr, b_ptr, a3, m0 + 3 * BMc + r, cols, M, N, stride_ym, HAS_BIAS)
    else:
        s = tl.program_id(1)
        pid_m = tl.program_id(2)
        k_lo = s * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
        cmask = cols[None, :] < N
        groups = tl.cdiv(M, GROUP_M * BMc)
        for g in range(pid_m, groups, tl.num_programs(2)):
            m0 = g * (GROUP_M * BMc)
            a0, a1, a2, a3 = _rows_x_tile(x_ptr, w_ptr, m0, cols, k_lo, k_hi, M, N, K, stride_xm, GROUP_M, BMc, BN, BK)
            _store_part(part_ptr, a0, s, m0 + r, cols, M, N)
            if GROUP_M > 1:
                _store_part(part_ptr, a1, s, m0 + BMc + r, cols, M, N)
            if GROUP_M > 2:
                _store_part(part_ptr, a2, s, m0 + 2 * BMc + r, cols, M, N)
                _store_part(part_ptr, a3, s, m0 + 3 * BMc + r, cols, M, N)
        # the last split of this (column tile, row programs) to arrive adds the partials in split order
        lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            for g in range(pid_m, groups, tl.num_programs(2)):
                for j in range(GROUP_M):
                    rows = (g * (GROUP_M * BMc) + j * BMc + r).to(tl.int64)
                    mask = (rows[:, None] < M) & cmask
                    acc = tl.zeros((BMc, BN), dtype=tl.float32)
                    for sp in range(SPLIT):
                        offs = (sp * M + rows[:, None]) * N + cols[None, :]
                        acc += tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
                    _store(y_ptr, b_ptr, acc, rows, cols, M, N, stride_ym, HAS_BIAS)
            tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")


@triton.jit
def _store_part(part_ptr, acc, s, rows, cols, M, N):
    rows = rows.to(tl.int64)
    offs = (s.to(tl.int64) * M + rows[:, None]) * N + cols[None, :]
    tl.store(part_ptr + offs, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           locks: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("w", w), ("out", out)):
        v.tensor(KERNEL, name, t)
        v.rank(KERNEL, name, t, 2)
        v.dtype(KERNEL, name, t, FLOAT_TYPES)
        v.check(t.stride(-1) == 1, KERNEL, name, "rows must have unit stride")
        v.check(t.device == x.device, KERNEL, name, f"must be on {x.device}, got {t.device}")
    v.check(w.is_contiguous(), KERNEL, "w", "must be contiguous [N, K]")
    v.check(w.dtype == x.dtype, KERNEL, "w", f"must have x's dtype {x.dtype}, got {w.dtype}")
    v.check(x.shape[0] >= 1, KERNEL, "x", "needs at least one row")
    v.check(x.shape[1] == w.shape[1], KERNEL, "x", f"must have K = {w.shape[1]} columns, got {x.shape[1]}")
    v.check(tuple(out.shape) == (x.shape[0], w.shape[0]), KERNEL, "out",
            f"must have shape {(x.shape[0], w.shape[0])}, got {tuple(out.shape)}")
    if bias is not None:
        v.check(tuple(bias.shape) == (w.shape[0],) and bias.device == x.device, KERNEL, "bias",
                f"must be [{w.shape[0]}] on {x.device}")
    if locks is not None:
        v.check(locks.dtype == torch.int32 and locks.device == x.device and locks.numel() >= lock_slots(w.shape[0]),
                KERNEL, "locks", f"must be int32 with >= {lock_slots(w.shape[0])} zeroed counters on {x.device}")
    if x.device.type == "cpu":
        v.check(v.TRITON_INTERPRETED, KERNEL, "x", "CPU tensors need TRITON_INTERPRET=1")


def dense_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    locks: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
    splits: int | None = None,
    wide: tuple[int, int, int, int, int] | bool | None = None,
    segment: int | None = None,
    seg_flat: bool | None = None,
) -> torch.Tensor:
    """x[M, K] @ w[N, K].T (+ bias) -> [M, N]. ``locks``: zeroed int32 counters (``lock_slots(N)``),
    owned by the caller and left zeroed; only a split shape needs them (allocated here if absent).
    ``config``/``splits``/``wide`` override the tuned choice (benchmarks and tests; splits must stay
    per shape; ``wide=False`` forces the 16-row kernel, a tuple a wide-tile configuration).
    ``segment``: K inputs per chain (a multiple of 256, the wide-tile kernel only): each segment's
    chain starts from zero and the chains are added in order, as the quantized kernels sum; ``seg_flat``
    (default SEG_FLAT where K and the segment are whole BK tiles) runs them as one loop, else one per segment."""
    if out is None:
        v.tensor(KERNEL, "x", x)
        v.tensor(KERNEL, "w", w)
        out = torch.empty(x.shape[0], w.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    _check(x, w, bias, out, locks)
    M, K = x.shape
    N = w.shape[0]
    # a segmented product is one unsplit chain per segment (split_k's split of a narrow, deep matrix
    # would be a second cut of K)
    s = (1 if segment is not None else split_k(N, K)) if splits is None else splits
    if segment is not None:
        v.check(segment > 0 and segment % 256 == 0, KERNEL, "segment", f"must be a positive multiple of 256, got {segment}")
        v.check(s == 1 and wide is not False and config is None, KERNEL, "segment", "needs the unsplit wide-tile kernel")
        wide = True
    wcfg = None if wide is False or config is not None else wide if isinstance(wide, tuple) else (
        wide_config(M, N, s) if x.device.type == "cuda" else (16, 16, 64, 4, 1) if wide and s == 1 else None)
    if segment is not None and wcfg is None:  # fewer rows than WIDE_MIN_M on the GPU
        wcfg = wide_config(WIDE_MIN_M, N, 1)
    if wcfg is not None:
        bm, bn, bk, warps, stages = wcfg
        seg = K if segment is None else min(segment, K)
        even = K % bk == 0 and seg % bk == 0
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        dense_matmul_wide_kernel[grid](
            x, w, bias if bias is not None else out, out, M, N, K, x.stride(0), out.stride(0), seg,
            HAS_BIAS=bias is not None, BMw=bm, BN=bn, BK=bk, EVEN_K=even, SEGMENTED=seg < K,
            SEG_FLAT=seg < K and even and (SEG_FLAT if seg_flat is None else seg_flat),
            num_warps=warps, num_stages=stages, enable_fp_fusion=False,
            **pdl.opts(x),
        )
        return out
    if x.device.type == "cuda":
        bn, bk, warps, stages, gm = config or launch_config(M, N, s)
    else:
        bn, bk, warps, stages, gm = 16, 64, 4, 1, group_m(M)
    if s > 1:
        ks = split_size(K, s)
        s = -(-K // ks)  # a short K may need fewer
    if s > 1:
        part = torch.empty((s, M, N), dtype=torch.float32, device=x.device)
        if locks is None:
            locks = torch.zeros(lock_slots(N), dtype=torch.int32, device=x.device)
        grid = (triton.cdiv(N, bn), s, min(MAX_ROW_PROGRAMS, triton.cdiv(M, gm * BM)))
    else:
        ks = K
        part = out
        locks = locks if locks is not None else out
        grid = (triton.cdiv(N, bn), triton.cdiv(M, gm * BM))
    dense_matmul_kernel[grid](
        x, w, bias if bias is not None else out, out, part, locks,
        M, N, K, x.stride(0), out.stride(0), ks,
        HAS_BIAS=bias is not None, SPLIT=s, GROUP_M=gm, BMc=BM, BN=bn, BK=bk,
        num_warps=warps, num_stages=stages, enable_fp_fusion=False,
        **pdl.opts(x),
    )
    return out
