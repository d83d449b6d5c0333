"""Causal GQA attention over the paged KV cache: prefill chunks and decode rows in one launch.

Batch invariance (the engine's determinism rule): the output of a query row
must not depend on the batch it runs in, its place there, or how its prompt
was chunked. So:

* one launch configuration for every call of a model (BLOCK_T tokens x G_PAD
  heads = 16 query rows per tile, BLOCK_N keys per block, fixed warps): the
  same instructions compute every row whether it is a decode token or the
  i-th token of a prefill chunk, so a token recomputed after preemption gets
  the very K/V it had;
* a row's keys are reduced in splits of S = SPLIT_BLOCKS x BLOCK_N keys at
  absolute positions (0, S, 2S, ...): an online softmax over each split's
  blocks in increasing order, from scratch, then the splits' (max, sum, acc)
  folded in split order (``_merge``, explicit fma). The reduction order is a
  function of the row's own position only;
* that fixed order can be computed two ways with bitwise the same result: one
  pass (``_paged_kernel``: a program per tile walks its splits) or a split
  pass with a program per split whose last program to finish merges
  (``_paged_split_kernel``: many programs for few long rows, e.g. a lone
  decode row, which one pass would walk on 4 of 132 SMs);
* the online softmax is the "safe" form (max floored at 0 while nothing is
  visible, exp(-inf) = 0), so a key block or split that is fully masked for a
  row is an exact no-op: a tile may visit more blocks than one of its rows needs.

A tile is (row, first token of the row's chunk, kv head); the G query heads
sharing that kv head are packed into the tile's rows. Every index comes from
device tensors, so a decode batch replays from a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from . import validate as val
from .paged_layout import block_n as _block_n, split_keys, tile_shape

_LOG2E = 1.4426950408889634


@triton.jit
def _tile_rows(q_ptr, tile_row_ptr, tile_q0_ptr, row_qstart_ptr, row_qlen_ptr, row_start_ptr, stride_qt, stride_qh,
               tile, kvh, window, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
               S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr):
    """The tile's query rows and the key range its splits cover: (q, pos, valid, t, head, r, qstart,
    last key, lowest key, first split, end split)."""
    r = tl.load(tile_row_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    qstart = tl.load(row_qstart_ptr + r)
    qlen = tl.load(row_qlen_ptr + r)
    start = tl.load(row_start_ptr + r)
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    m = tl.arange(0, BLOCK_M)
    t = q0 + m // G_PAD
    g = m % G_PAD
    valid = (t < qlen) & (g < G)
    pos = tl.where(valid, start + t, start + q0)  # padding rows: any visible position, never stored
    head = kvh * G + g
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + (qstart + t)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=valid[:, None] & (d < D)[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    last = start + tl.minimum(q0 + BLOCK_T, qlen) - 1  # the tile's highest real position
    lo = 0
    if HAS_WINDOW:
        first = start + q0 - window + 1  # lowest key any row of the tile can see
        lo = tl.maximum(first, 0) // BLOCK_N * BLOCK_N
    return q, pos, valid, t, head, r, qstart, last, lo, lo // S, last // S + 1


@triton.jit
def _split(q, pos, r, kvh, k_ptr, v_ptr, bt_ptr, n_from, n_to, last,
           stride_kb, stride_ks, stride_kh, stride_bt, scale_log2, window,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
           HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax over the keys [n_from, n_to) of one split, from scratch: (max, sum, acc)."""
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(n_from, n_to, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n <= last
        page = tl.load(bt_ptr + r * stride_bt + n // BS, mask=n_ok, other=0)
        kv_off = page.to(tl.int64) * stride_kb + (n % BS) * stride_ks + kvh * stride_kh
        kv_mask = n_ok[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:  # fp32 inputs (tests): exact fp32 products, not tf32
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            s = tl.dot(q, tl.trans(k)) * scale_log2
        vis = n[None, :] <= pos[:, None]
        if HAS_WINDOW:
            vis = vis & (pos[:, None] - n[None, :] < window)
        s = tl.where(vis, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST or IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _merge(m, l, acc, m_s, l_s, acc_s):
    """Fold one split's (max, sum, acc) into the running ones. Explicit fma: the same rounding in the
    one-pass kernel and in the merge kernel. A split no key of which a row sees is an exact no-op."""
    m_new = tl.maximum(m, m_s)
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    a = tl.exp2(m - m_safe)
    b = tl.exp2(m_s - m_safe)
    l = tl.fma(l, a, l_s * b)
    acc = tl.fma(acc, a[:, None], acc_s * b[:, None])
    return m_new, l, acc


# The block-table row stride is the step's widest table: not specialised on, or every new width class
# (1, multiple of 16, other) would be a JIT compile in the middle of serving.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr,
    tile_row_ptr, tile_q0_ptr, row_qstart_ptr, row_qlen_ptr, row_start_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_bt,
    scale_log2, window,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """One pass: a program per (tile, kv head) walks the tile's splits in order, merging each."""
    pdl.enter(GDC)
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    q, pos, valid, t, head, r, qstart, last, lo, j_lo, j_hi = _tile_rows(
        q_ptr, tile_row_ptr, tile_q0_ptr, row_qstart_ptr, row_qlen_ptr, row_start_ptr, stride_qt, stride_qh,
        tile, kvh, window, G, G_PAD, BLOCK_T, BLOCK_N, S, D, BLOCK_D, HAS_WINDOW, UPCAST)
    m_t = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(j_lo, j_hi):
        m_s, l_s, acc_s = _split(q, pos, r, kvh, k_ptr, v_ptr, bt_ptr, tl.maximum(j * S, lo),
                                 tl.minimum(j * S + S, last + 1), last, stride_kb, stride_ks, stride_kh, stride_bt,
                                 scale_log2, window, BLOCK_M, BLOCK_N, BS, D, BLOCK_D, HAS_WINDOW, UPCAST, IEEE)
        m_t, l_t, acc_t = _merge(m_t, l_t, acc_t, m_s, l_s, acc_s)
    out = acc_t / l_t[:, None]
    d = tl.arange(0, BLOCK_D)
    tl.store(
        o_ptr + (qstart + t)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(o_ptr.dtype.element_ty), mask=valid[:, None] & (d < D)[None, :],
    )


@triton.jit(do_not_specialize=["stride_bt"])
def _paged_split_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, ml_ptr, acc_ptr, lock_ptr, bt_ptr, slot0_ptr,
    tile_row_ptr, tile_q0_ptr, row_qstart_ptr, row_qlen_ptr, row_start_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    scale_log2, window, H_KV, P,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Program (tile, kv head, p) computes splits p, p + P, ... of the tile, each on its own, into its
    slot (the tile's first slot + split index) of the partials scratch; the last of the tile's P
    programs with a split (an acq_rel counter, reset after) to finish folds the partials in split order, as
    the one-pass kernel does, and writes the output: no second launch per layer."""
    pdl.enter(GDC)
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    p = tl.program_id(2)
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    q, pos, valid, t, head, r, qstart, last, lo, j_lo, j_hi = _tile_rows(
        q_ptr, tile_row_ptr, tile_q0_ptr, row_qstart_ptr, row_qlen_ptr, row_start_ptr, stride_qt, stride_qh,
        tile, kvh, window, G, G_PAD, BLOCK_T, BLOCK_N, S, D, BLOCK_D, HAS_WINDOW, UPCAST)
    # programs with a split to compute: the others leave at once, so a lone short row's 64 programs do not queue
    # 64 atomics on one counter (the same splits, the same merge order: no bit changes)
    busy = tl.minimum(P, j_hi - j_lo)
    if p < busy:
        slot0 = tl.load(slot0_ptr + tile)
        mm = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        for j in range(j_lo + p, j_hi, P):
            m_s, l_s, acc_s = _split(q, pos, r, kvh, k_ptr, v_ptr, bt_ptr, tl.maximum(j * S, lo),
                                     tl.minimum(j * S + S, last + 1), last, stride_kb, stride_ks, stride_kh, stride_bt,
                                     scale_log2, window, BLOCK_M, BLOCK_N, BS, D, BLOCK_D, HAS_WINDOW, UPCAST, IEEE)
            at = (slot0 + j).to(tl.int64) * H_KV + kvh
            tl.store(ml_ptr + at * (2 * BLOCK_M) + mm, m_s)
            tl.store(ml_ptr + at * (2 * BLOCK_M) + BLOCK_M + mm, l_s)
            tl.store(acc_ptr + at * (BLOCK_M * BLOCK_D) + mm[:, None] * BLOCK_D + d[None, :], acc_s)
        lock = lock_ptr + tile * H_KV + kvh
        done = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if done == busy - 1:
            m_t = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
            l_t = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for j in range(j_lo, j_hi):
                at = (slot0 + j).to(tl.int64) * H_KV + kvh
                # .cg: from L2, where the other programs' stores are (not a stale L1 line)
                m_s = tl.load(ml_ptr + at * (2 * BLOCK_M) + mm, cache_modifier=".cg")
                l_s = tl.load(ml_ptr + at * (2 * BLOCK_M) + BLOCK_M + mm, cache_modifier=".cg")
                acc_s = tl.load(acc_ptr + at * (BLOCK_M * BLOCK_D) + mm[:, None] * BLOCK_D + d[None, :], cache_modifier=".cg")
                m_t, l_t, acc_t = _merge(m_t, l_t, acc_t, m_s, l_s, acc_s)
            out = acc_t / l_t[:, None]
            tl.store(
                o_ptr + (qstart + t)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                out.to(o_ptr.dtype.element_ty), mask=valid[:, None] & (d < D)[None, :],
            )
            tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")  # ready for the next layer / replay


def block_n(d: int, dtype: torch.dtype) -> int:
    """Keys per block: fixed per (head_dim, dtype), i.e. per model."""
    return _block_n(d, dtype.itemsize)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    tile_row: torch.Tensor,
    tile_q0: torch.Tensor,
    row_qstart: torch.Tensor,
    row_qlen: torch.Tensor,
    row_start: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] (rows' tokens back to back) over the paged cache [NB, BS, Hk, D] -> [T, Hq, D].

    Row r's tokens are q[row_qstart[r] : row_qstart[r] + row_qlen[r]] at positions
    row_start[r].., its keys are positions 0..row_start[r]+row_qlen[r]-1 found through
    block_tables[r]; tile i covers row tile_row[i]'s tokens tile_q0[i] .. + BLOCK_T.

    ``split`` = (slot0 [tiles] int32, ml [slots, Hk, 2, BLOCK_M] fp32, acc [slots, Hk, BLOCK_M, BLOCK_D]
    fp32, locks [>= tiles * Hk] int32, zero): run the splits in parallel (the last program of a tile merges)
    — bitwise the one-pass result, more programs for few long rows; the locks are zero again after. Tile i's split j goes to slot slot0[i] + j: the caller makes the slots of
    different tiles disjoint and inside the scratch (tile i needs one per split up to its last position:
    ``last // S + 1``; ``runner.ModelRunner._replay``).
    """
    kernel = "paged_attention"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        val.tensor(kernel, name, t)
    val.rank(kernel, "q", q, 3)
    val.rank(kernel, "k_cache", k_cache, 4)
    val.shape(kernel, "v_cache", v_cache, tuple(k_cache.shape))
    T, Hq, D = q.shape
    _, BS, Hk, Dk = k_cache.shape
    val.check(Dk == D, kernel, "k_cache", f"head dim {Dk} != q's {D}")
    val.check(Hk >= 1 and Hq % Hk == 0, kernel, "q", f"{Hq} query heads are not a multiple of {Hk} kv heads")
    val.check(q.stride(2) == 1 and k_cache.stride(3) == 1, kernel, "q", "last dimension must have unit stride")
    val.check(k_cache.is_contiguous() and v_cache.is_contiguous(), kernel, "k_cache", "must be contiguous")
    for name, t in (("block_tables", block_tables), ("tile_row", tile_row), ("tile_q0", tile_q0),
                    ("row_qstart", row_qstart), ("row_qlen", row_qlen), ("row_start", row_start)):
        val.tensor(kernel, name, t)
        val.dtype(kernel, name, t, (torch.int32,))
    val.rank(kernel, "block_tables", block_tables, 2)
    val.check(block_tables.stride(1) == 1, kernel, "block_tables", "rows must have unit stride")
    window = 0 if sliding_window is None else int(sliding_window)
    val.check(window >= 0, kernel, "sliding_window", "must be positive or None")
    if out is None:
        out = torch.empty_like(q)
    g_pad, block_t = tile_shape(Hq, Hk)
    upcast = q.device.type == "cpu"  # the interpreter multiplies 16-bit dots as integers
    grid = (tile_row.shape[0], Hk)
    if grid[0] == 0:
        return out
    consts = dict(G=Hq // Hk, G_PAD=g_pad, BLOCK_T=block_t, BLOCK_N=block_n(D, q.dtype), S=split_keys(D, q.dtype.itemsize),
                  D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), HAS_WINDOW=window > 0, UPCAST=upcast)
    if split is not None:
        slot0, ml, acc, locks = split
        bm, bd = g_pad * block_t, consts["BLOCK_D"]
        for name, t in (("split slot0", slot0), ("split locks", locks)):
            val.tensor(kernel, name, t)
            val.dtype(kernel, name, t, (torch.int32,))
        val.check(slot0.shape[0] >= grid[0], kernel, "split slot0", f"{slot0.shape[0]} slots for {grid[0]} tiles")
        val.check(locks.dim() == 1 and locks.shape[0] >= grid[0] * Hk, kernel, "split locks",
                  f"needs {grid[0] * Hk} counters, has {list(locks.shape)}")
        for name, t, shape in (("split ml", ml, (Hk, 2, bm)), ("split acc", acc, (Hk, bm, bd))):
            val.tensor(kernel, name, t)
            val.dtype(kernel, name, t, (torch.float32,))
            val.check(t.dim() == 4 and tuple(t.shape[1:]) == shape and t.is_contiguous(), kernel, name,
                      f"must be a contiguous [slots, {', '.join(map(str, shape))}] tensor, not {list(t.shape)}")
        val.check(ml.shape[0] == acc.shape[0], kernel, "split acc", "ml and acc must have as many slots")
        progs = max(1, min(64, 1024 // (grid[0] * Hk)))  # programs per (tile, kv head): work split, not numerics
        try:
            _paged_split_kernel[(grid[0], Hk, progs)](
                q, k_cache, v_cache, out, ml, acc, locks, block_tables, slot0,
                tile_row, tile_q0, row_qstart, row_qlen, row_start,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
                scale * _LOG2E, window, Hk, progs, BS=BS, IEEE=q.dtype == torch.float32, **consts,
                num_warps=4, num_stages=2,
                **pdl.opts(q),
            )
        except Exception as exc:  # noqa: BLE001
            raise val.launch_error(kernel, q.device, exc) from exc
        return out
    try:
        _paged_kernel[grid](
            q, k_cache, v_cache, out, block_tables,
            tile_row, tile_q0, row_qstart, row_qlen, row_start,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            scale * _LOG2E, window, BS=BS, IEEE=q.dtype == torch.float32, **consts,
            num_warps=4, num_stages=2,
            **pdl.opts(q),
        )
    except Exception as exc:  # noqa: BLE001
        raise val.launch_error(kernel, q.device, exc) from exc
    return out
