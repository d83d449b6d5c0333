"""Causal GQA attention: flash-attention prefill and split-K flash-decoding.

Both use the online softmax in fp32 (base-2 exponent, scale folded in) and
tile over keys, so memory is O(tile) whatever the sequence length. Grouped
query attention maps q head ``h`` to kv head ``h // (Hq // Hk)``.

Decode reads ``seq_len`` from device memory and launches a grid that depends
only on ``S_max``: every split-K program owns a fixed chunk of the cache and
does nothing when its chunk is empty, and a second kernel merges the chunks
in index order. No host sync, no atomics, so it can be captured in a CUDA
graph and gives bitwise-identical output for identical inputs (SPEC 4711).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import validate as val

_LOG2E = 1.4426950408889634
_MASKED = tl.constexpr(-1.0e30)  # finite "minus infinity": a fully masked tile never produces inf - inf
_MAX_SPLITS = 512


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's CPU interpreter multiplies bf16 bit patterns as integers in tl.dot
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    n_q, n_kv, q_offset, window, group, scale_log2,
    q_st, q_sh, k_st, k_sh, v_st, v_sh, o_st, o_sh,
    head_dim,
    HAS_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m_blk = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    row_mask = offs_m < n_q
    q = tl.load(
        q_ptr + offs_m[:, None] * q_st + head * q_sh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    q_pos = q_offset + offs_m

    hi = tl.minimum(n_kv, q_offset + (m_blk + 1) * BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, q_offset + m_blk * BLOCK_M - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], _MASKED, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_kv
        kt = tl.load(
            k_ptr + offs_n[None, :] * k_st + kv_head * k_sh + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None], other=0.0,
        )
        s = _dot(q, kt, IEEE, UPCAST) * scale_log2
        valid = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            valid = valid & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(valid, s, _MASKED)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(
            v_ptr + offs_n[:, None] * v_st + kv_head * v_sh + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE, UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + offs_m[:, None] * o_st + head * o_sh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seq_len_ptr, acc_ptr, m_ptr, l_ptr,
    s_max, window, group, n_q_heads, scale_log2,
    q_sh, k_st, k_sh, v_st, v_sh,
    head_dim,
    CHUNK: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    # Clamped: a bad seq_len can give wrong numbers but never an out-of-bounds read.
    n = tl.minimum(tl.maximum(tl.load(seq_len_ptr).to(tl.int32), 1), s_max)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, n)
    lo = start
    if HAS_WINDOW:
        lo = tl.maximum(start, n - window)
    if lo < end:
        offs_g = tl.arange(0, BLOCK_G)
        g_mask = offs_g < group
        heads = kv_head * group + offs_g
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        q = tl.load(q_ptr + heads[:, None] * q_sh + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_G], _MASKED, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for kb in range(lo, end, BLOCK_N):
            offs_n = kb + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            kt = tl.load(
                k_ptr + offs_n[None, :] * k_st + kv_head * k_sh + offs_d[:, None],
                mask=n_mask[None, :] & d_mask[:, None], other=0.0,
            )
            s = _dot(q, kt, IEEE, UPCAST) * scale_log2
            s = tl.where(n_mask[None, :], s, _MASKED)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(
                v_ptr + offs_n[:, None] * v_st + kv_head * v_sh + offs_d[None, :],
                mask=n_mask[:, None] & d_mask[None, :], other=0.0,
            )
            acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE, UPCAST)
            m_i = m_new
        row = split * n_q_heads + heads
        tl.store(acc_ptr + row[:, None] * head_dim + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(m_ptr + row, m_i, mask=g_mask)
        tl.store(l_ptr + row, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    seq_len_ptr, acc_ptr, m_ptr, l_ptr, o_ptr,
    s_max, window, n_q_heads, o_sh, head_dim,
    CHUNK: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    n = tl.minimum(tl.maximum(tl.load(seq_len_ptr).to(tl.int32), 1), s_max)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(n - window, 0) // CHUNK
    last = tl.cdiv(n, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    m_run = -float("inf")
    l_run = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Exactly the splits the split kernel wrote, merged in index order: deterministic.
    for s in range(first, last):
        row = s * n_q_heads + head
        m_s = tl.load(m_ptr + row)
        l_s = tl.load(l_ptr + row)
        a_s = tl.load(acc_ptr + row * head_dim + offs_d, mask=d_mask, other=0.0)
        m_new = tl.maximum(m_run, m_s)
        w_run = tl.exp2(m_run - m_new)
        w_s = tl.exp2(m_s - m_new)
        l_run = l_run * w_run + l_s * w_s
        acc = acc * w_run + a_s * w_s
        m_run = m_new
    tl.store(o_ptr + head * o_sh + offs_d, (acc / l_run).to(o_ptr.dtype.element_ty), mask=d_mask)


def _interpreted_bf16(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _prefill_config(d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): fits H100 shared memory, (almost) no register spills.

    fp32 runs exact-fp32 FMA dots (tests only; the engine runs 16-bit on the
    GPU), whose register appetite forces small tiles.
    """
    if device.type == "cpu":  # interpreter: numpy tiles, fewer programs is faster
        return 32, 32, 4, 1
    if dtype == torch.float32:
        return (32, 32, 4, 1) if d <= 64 else ((16, 32, 4, 1) if d <= 128 else (16, 16, 4, 1))
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128:
        return 128, 64, 8, 2
    return 64, 32, 8, 2


def _decode_block_n(d: int, dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return 16
    return 64 if d <= 128 else 32


def _check_window(kernel: str, sliding_window: object) -> int:
    if sliding_window is None:
        return 0
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0:
        val.fail(kernel, "sliding_window", f"must be None or a positive int, got {sliding_window!r}")
    return sliding_window


def _check_scale(kernel: str, scale: object) -> float:
    s = val.finite_float(kernel, "scale", scale)
    if s <= 0:
        val.fail_param(kernel, "scale", f"must be > 0, got {s}")
    return s


def _check_qkv(
    kernel: str, q: object, k: object, vv: object, q_rank: int, k_name: str, v_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = val.tensor(kernel, "q", q)
    k = val.tensor(kernel, k_name, k)
    vv = val.tensor(kernel, v_name, vv)
    val.rank(kernel, "q", q, q_rank)
    val.rank(kernel, k_name, k, 3)
    val.rank(kernel, v_name, vv, 3)
    for name, t in (("q", q), (k_name, k), (v_name, vv)):
        val.positive_dims(kernel, name, t)
        val.unit_last_stride(kernel, name, t)
        val.int32_addressable(kernel, name, t)
    val.dtype(kernel, "q", q, val.FLOAT_DTYPES)
    val.same_dtype(kernel, {"q": q, k_name: k, v_name: vv})
    val.check(k.shape == vv.shape, kernel, v_name, f"shape must equal {k_name}'s {tuple(k.shape)}, got {tuple(vv.shape)}")
    hq, d = q.shape[-2], q.shape[-1]
    hk = k.shape[1]
    val.check(k.shape[2] == d, kernel, k_name, f"head dim must equal q's {d}, got {k.shape[2]}")
    val.check(d <= 256, kernel, "q", f"head dim must be <= 256, got {d}")
    val.check(hq % hk == 0, kernel, k_name, f"kv heads ({hk}) must divide q heads ({hq}) for GQA")
    return q, k, vv


def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    q_offset: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over k, v [S, Hk, D]; returns [T, Hq, D] in q's dtype.

    Query i sits at absolute position ``q_offset + i`` and sees keys
    ``0 .. q_offset + i`` (only the last ``sliding_window`` of them when
    given). Needs ``q_offset + T <= S``; rows of k/v past that are never
    read, so a whole (partly uninitialised) cache can be passed.
    """
    kernel = "attention_prefill"
    q, k, vv = _check_qkv(kernel, q, k, v, 3, "k", "v")
    device = val.same_device(kernel, {"q": q, "k": k, "v": vv})
    scale_f = _check_scale(kernel, scale)
    window = _check_window(kernel, sliding_window)
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        val.fail(kernel, "q_offset", f"must be an int >= 0, got {q_offset!r}")
    t, hq, d = q.shape
    s, hk, _ = k.shape
    val.check(q_offset + t <= s, kernel, "k", f"must hold q_offset + T = {q_offset + t} rows, got S={s}")
    if out is None:
        out = torch.empty((t, hq, d), dtype=q.dtype, device=device)
    else:
        out = val.tensor(kernel, "out", out)
        val.check(out.device == device, kernel, "out", f"must be on q's device {device}, got {out.device}")
        val.shape(kernel, "out", out, (t, hq, d))
        val.check(out.dtype == q.dtype, kernel, "out", f"dtype must be {q.dtype}, got {out.dtype}")
        val.unit_last_stride(kernel, "out", out)
        val.int32_addressable(kernel, "out", out)
    bm, bn, warps, stages = _prefill_config(d, q.dtype, device)
    grid = (triton.cdiv(t, bm), hq)
    try:
        _prefill_kernel[grid](
            q, k, vv, out,
            t, q_offset + t, q_offset, window, hq // hk, scale_f * _LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), vv.stride(0), vv.stride(1), out.stride(0), out.stride(1),
            d,
            HAS_WINDOW=window > 0, IEEE=q.dtype == torch.float32, UPCAST=_interpreted_bf16(q),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(d), num_warps=warps, num_stages=stages,
        )
    except Exception as exc:  # noqa: BLE001
        raise val.launch_error(kernel, device, exc) from exc
    return out


def decode_split_size(s_max: int) -> int:
    """Keys per split-K program: small enough to spread short sequences over many SMs, capped in count."""
    return max(128, triton.next_power_of_2(triton.cdiv(s_max, _MAX_SPLITS)))


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    split_size: int | None = None,
) -> torch.Tensor:
    """One query token q [Hq, D] over the first ``seq_len[0]`` rows of k/v_cache [S_max, Hk, D].

    ``seq_len`` (int32 [1], on the device) counts valid rows including the
    current token. It is range-checked on the host only when it lives on the
    host; on the GPU the kernels clamp it to [1, S_max] (memory-safe, no sync):
    the generator that writes it owns its correctness. ``split_size`` (keys
    per split-K program, a power of two >= 16) defaults to ``decode_split_size``.
    """
    kernel = "attention_decode"
    q, k, vv = _check_qkv(kernel, q, k_cache, v_cache, 2, "k_cache", "v_cache")
    seq_len = val.tensor(kernel, "seq_len", seq_len)
    val.dtype(kernel, "seq_len", seq_len, val.INDEX_DTYPES)
    val.shape(kernel, "seq_len", seq_len, (1,))
    named = {"q": q, "k_cache": k, "v_cache": vv, "seq_len": seq_len}
    if out is not None:
        named["out"] = val.tensor(kernel, "out", out)
    device = val.same_device(kernel, named)
    scale_f = _check_scale(kernel, scale)
    window = _check_window(kernel, sliding_window)
    hq, d = q.shape
    s_max, hk, _ = k.shape
    if seq_len.device.type == "cpu":
        n = int(seq_len[0])
        val.check(1 <= n <= s_max, kernel, "seq_len", f"must be in [1, S_max={s_max}], got {n}")
    chunk = decode_split_size(s_max) if split_size is None else split_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1):
        val.fail(kernel, "split_size", f"must be a power of two >= 16, got {split_size!r}")
    if out is None:
        out = torch.empty((hq, d), dtype=q.dtype, device=device)
    else:
        val.shape(kernel, "out", out, (hq, d))
        val.check(out.dtype == q.dtype, kernel, "out", f"dtype must be {q.dtype}, got {out.dtype}")
        val.unit_last_stride(kernel, "out", out)
        val.int32_addressable(kernel, "out", out)
    n_splits = triton.cdiv(s_max, chunk)
    val.check(n_splits * hq * d <= val.INT32_MAX, kernel, "split_size", "split-K workspace must be int32-addressable")
    part_acc = torch.empty((n_splits, hq, d), dtype=torch.float32, device=device)
    part_m = torch.empty((n_splits, hq), dtype=torch.float32, device=device)
    part_l = torch.empty((n_splits, hq), dtype=torch.float32, device=device)
    group = hq // hk
    block_n = min(chunk, _decode_block_n(d, q.dtype))
    block_d = _block_d(d)
    ieee = q.dtype == torch.float32
    try:
        _decode_split_kernel[(hk, n_splits)](
            q, k, vv, seq_len, part_acc, part_m, part_l,
            s_max, window, group, hq, scale_f * _LOG2E,
            q.stride(0), k.stride(0), k.stride(1), vv.stride(0), vv.stride(1),
            d,
            CHUNK=chunk, HAS_WINDOW=window > 0, IEEE=ieee, UPCAST=_interpreted_bf16(q),
            BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=4, num_stages=2,
        )
        _decode_reduce_kernel[(hq,)](
            seq_len, part_acc, part_m, part_l, out,
            s_max, window, hq, out.stride(0), d,
            CHUNK=chunk, HAS_WINDOW=window > 0, BLOCK_D=block_d, num_warps=4,
        )
    except Exception as exc:  # noqa: BLE001
        raise val.launch_error(kernel, device, exc) from exc
    return out


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
    sliding_window: int | None = None, q_offset: int = 0, compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dense masked softmax attention, [T, Hq, D] -> [T, Hq, D] in ``compute_dtype`` (ground truth)."""
    t, hq, _ = q.shape
    s, hk, _ = k.shape
    group = hq // hk
    qf = q.to(compute_dtype).transpose(0, 1)  # [Hq, T, D]
    kf = k.to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (qf @ kf.transpose(1, 2)) * scale  # [Hq, T, S]
    qpos = torch.arange(t, device=q.device)[:, None] + q_offset
    kpos = torch.arange(s, device=q.device)[None, :]
    allowed = kpos <= qpos
    if sliding_window is not None:
        allowed = allowed & (kpos > qpos - sliding_window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vf).transpose(0, 1)
