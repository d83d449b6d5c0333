"""Rotary position embedding, in place on q and k (llama "interleaved" and neox variants).

Positions are read from device memory, so a captured decode graph replays
with new positions. The angle ``pos * inv_freq`` is where fp32 RoPE loses
accuracy: at position 30k a naive fp32 product is off by ~2e-3 rad. Here the
frequency is kept in *turns* (``inv_freq / 2pi``) split into a 12-bit-mantissa
high part and a low part (built once per (theta, rotary_dim, device) in
float64), and the position into 12-bit halves, so the big partial products
are exact in fp32 and the reduction modulo one turn is exact too. The angle
then carries ~1e-7 rad of error up to position 2^17 (~1e-6 at 2^20), which
is what lets the tests hold fp32 RoPE to 1e-5 of a float64 reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from . import validate as v

_HEAD_BLOCK = 8


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    freq_ptr,
    n_q_heads,
    n_k_heads,
    q_tok_stride,
    q_head_stride,
    k_tok_stride,
    k_head_stride,
    half,
    NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    v_ptr=None,
    kc_ptr=None,
    vc_ptr=None,
    slot_ptr=None,
    v_tok_stride=0,
    STORE: tl.constexpr = False,
    HEAD_DIM: tl.constexpr = 0,
    BLOCK_D: tl.constexpr = 16,
    GDC: tl.constexpr = False,
):
    pdl.enter(GDC)
    tok = tl.program_id(0)
    blk = tl.program_id(1)
    n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    n_k_blocks = tl.cdiv(n_k_heads, BLOCK_H)
    is_v = blk >= n_q_blocks + n_k_blocks  # rope_store_ only: programs that copy V heads, rotating nothing
    if STORE:
        if is_v:
            hv = (blk - n_q_blocks - n_k_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            d = tl.arange(0, BLOCK_D)
            vmask = (hv < n_k_heads)[:, None] & (d < HEAD_DIM)[None, :]
            vrow = tl.load(slot_ptr + tok).to(tl.int64) * (n_k_heads * HEAD_DIM)
            vals = tl.load(v_ptr + tok.to(tl.int64) * v_tok_stride + hv[:, None] * HEAD_DIM + d[None, :], mask=vmask)
            tl.store(vc_ptr + vrow + hv[:, None] * HEAD_DIM + d[None, :], vals, mask=vmask)
    is_q = blk < n_q_blocks
    head0 = tl.where(is_q, blk, blk - n_q_blocks) * BLOCK_H
    n_heads = tl.where(is_q, n_q_heads, n_k_heads)
    if STORE:
        n_heads = tl.where(is_v, 0, n_heads)  # V's programs rotate nothing
    tok_stride = tl.where(is_q, q_tok_stride, k_tok_stride)
    head_stride = tl.where(is_q, q_head_stride, k_head_stride)

    r = tl.arange(0, BLOCK_R)
    r_mask = r < half
    pos = tl.load(pos_ptr + tok).to(tl.int32)
    f_hi = tl.load(freq_ptr + r, mask=r_mask, other=0.0)
    f_lo = tl.load(freq_ptr + half + r, mask=r_mask, other=0.0)
    # pos = a * 4096 + b; a*(4096 f_hi) and b*f_hi are exact (12 x 12 significant bits).
    a = (pos >> 12).to(tl.float32)
    b = (pos & 4095).to(tl.float32)
    t1 = a * (f_hi * 4096.0)
    t2 = b * f_hi
    turns = (t1 - tl.floor(t1)) + (t2 - tl.floor(t2))
    t3 = pos.to(tl.float32) * f_lo
    turns = (turns - tl.floor(turns)) + (t3 - tl.floor(t3))
    turns = turns - tl.floor(turns + 0.5)  # in [-0.5, 0.5): best fp32 resolution
    angle = turns * 6.283185307179586
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]

    if NEOX:
        off1 = r
        off2 = r + half
    else:
        off1 = 2 * r
        off2 = 2 * r + 1
    h = head0 + tl.arange(0, BLOCK_H)
    mask = (h < n_heads)[:, None] & r_mask[None, :]
    row = tok * tok_stride + h[:, None] * head_stride
    if is_q:
        base = q_ptr
    else:
        base = k_ptr
    x1 = tl.load(base + row + off1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + row + off2[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(base.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(base.dtype.element_ty)
    tl.store(base + row + off1[None, :], y1, mask=mask)
    tl.store(base + row + off2[None, :], y2, mask=mask)
    if STORE:
        if blk >= n_q_blocks:  # K's programs (V's are masked off): the rotated K into the token's cache row too
            crow = tl.load(slot_ptr + tok).to(tl.int64) * (n_k_heads * HEAD_DIM) + h[:, None] * HEAD_DIM
            tl.store(kc_ptr + crow + off1[None, :], y1, mask=mask)
            tl.store(kc_ptr + crow + off2[None, :], y2, mask=mask)


def _split12(f: float) -> float:
    """Round ``f`` to 12 significant bits, so products with 12-bit integers are exact in fp32."""
    if f == 0.0:
        return 0.0
    m, e = math.frexp(f)
    return math.ldexp(round(m * 4096.0), e - 12)


def freq_table(theta: float, rotary_dim: int, device: torch.device, freq_scale: float = 1.0) -> torch.Tensor:
    """[2, rotary_dim/2] fp32: high and low parts of ``freq_scale * theta^(-2i/rotary_dim) / 2pi``
    (turns per position).

    Not cached here (SPEC 4013: no process-global device memory): the model builds its tables
    once, before any CUDA-graph capture, and passes them to ``rope_`` (an upload inside a
    capture would fail); without one, ``rope_`` builds a table for the call.
    """
    half = rotary_dim // 2
    turns = [freq_scale * theta ** (-2.0 * i / rotary_dim) / (2.0 * math.pi) for i in range(half)]
    hi = [_split12(f) for f in turns]
    lo = [f - h for f, h in zip(turns, hi, strict=True)]
    return torch.tensor([hi, lo], dtype=torch.float32).to(device)


def _check(
    q: object, k: object, positions: object, theta: object, rotary_dim: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    kernel = "rope_"
    q = v.tensor(kernel, "q", q)
    k = v.tensor(kernel, "k", k)
    positions = v.tensor(kernel, "positions", positions)
    v.rank(kernel, "q", q, 3)
    v.rank(kernel, "k", k, 3)
    v.rank(kernel, "positions", positions, 1)
    v.positive_dims(kernel, "q", q)
    v.positive_dims(kernel, "k", k)
    v.dtype(kernel, "q", q, v.FLOAT_DTYPES)
    v.same_dtype(kernel, {"q": q, "k": k})
    v.dtype(kernel, "positions", positions, v.INDEX_DTYPES)
    t, _, dh = q.shape
    v.check(k.shape[0] == t, kernel, "k", f"must have T={t} rows like q, got {k.shape[0]}")
    v.check(k.shape[2] == dh, kernel, "k", f"head dim must equal q's {dh}, got {k.shape[2]}")
    v.shape(kernel, "positions", positions, (t,))
    v.contiguous(kernel, "positions", positions)
    v.unit_last_stride(kernel, "q", q)
    v.unit_last_stride(kernel, "k", k)
    v.int32_addressable(kernel, "q", q)
    v.int32_addressable(kernel, "k", k)
    theta_f = v.finite_float(kernel, "theta", theta)
    if theta_f <= 1.0:
        v.fail_param(kernel, "theta", f"must be > 1, got {theta_f}")
    rd = dh if rotary_dim is None else rotary_dim
    if isinstance(rd, bool) or not isinstance(rd, int) or rd <= 0 or rd % 2 or rd > dh:
        v.fail(kernel, "rotary_dim", f"must be an even int in (0, head_dim={dh}], got {rotary_dim!r}")
    # q and k may interleave inside one fused QKV buffer; only the same view twice is an error.
    v.check(q.data_ptr() != k.data_ptr(), kernel, "k", "must not be the same memory as q (it would be rotated twice)")
    return q, k, positions, theta_f, rd


def rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    neox: bool,
    rotary_dim: int | None = None,
    *,
    freq_scale: float = 1.0,
    freq: torch.Tensor | None = None,
) -> None:
    """Rotate q [T, Hq, Dh] and k [T, Hk, Dh] in place by ``positions`` [T].

    ``freq``: the caller's ``freq_table(theta, rotary_dim, device, freq_scale)`` (graph-safe).

    ``neox`` pairs (i, i + rd/2); otherwise llama's interleaved (2i, 2i+1).
    Dims past ``rotary_dim`` pass through. ``freq_scale`` is linear RoPE
    scaling (llama.cpp's ``rope_freq_scale`` = 1 / HF ``rope_scaling.factor``):
    the angle is ``pos * freq_scale * theta^(-2i/rd)``. q and k may be
    strided views of a fused QKV buffer (unit stride on the last dim).
    Positions are not range-checked on the host (that would sync); negative
    ones rotate backwards, which is well defined and memory-safe.
    """
    q, k, positions, theta_f, rd = _check(q, k, positions, theta, rotary_dim)
    table, device = _table(q, k, positions, theta_f, rd, freq_scale, freq)
    _launch(q, k, positions, table, rd, neox, device)


def _table(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float, rd: int, freq_scale: float,
           freq: torch.Tensor | None) -> tuple[torch.Tensor, torch.device]:
    """The checked frequency table (the caller's, or one built for this call) and the device."""
    device = v.same_device("rope_", {"q": q, "k": k, "positions": positions})
    scale = v.finite_float("rope_", "freq_scale", freq_scale)
    if scale <= 0:
        v.fail_param("rope_", "freq_scale", f"must be > 0, got {scale}")
    if freq is None:
        return freq_table(theta, rd, device, scale), device
    table = v.tensor("rope_", "freq", freq)
    v.check(tuple(table.shape) == (2, rd // 2) and table.dtype == torch.float32 and table.device == device
            and table.is_contiguous(), "rope_", "freq", f"must be fp32 [2, {rd // 2}] on {device}")
    return table, device


def _launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rd: int, neox: bool,
            device: torch.device, store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
            kernel: str = "rope_") -> None:
    """One launch over (token, head block); ``store`` = (v, k_cache, v_cache, slots) adds rope_store_'s V
    programs and K's cache writes."""
    half = rd // 2
    t, hq, dh = q.shape
    hk = k.shape[1]
    nb = triton.cdiv(hq, _HEAD_BLOCK) + triton.cdiv(hk, _HEAD_BLOCK)
    extra: dict[str, object] = {}
    if store is not None:
        vv, kc, vc, slots = store
        nb += triton.cdiv(hk, _HEAD_BLOCK)
        extra = dict(v_ptr=vv, kc_ptr=kc, vc_ptr=vc, slot_ptr=slots, v_tok_stride=vv.stride(0), STORE=True,
                     HEAD_DIM=dh, BLOCK_D=max(16, triton.next_power_of_2(dh)))
    try:
        _rope_kernel[(t, nb)](
            q, k, positions, table, hq, hk,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), half,
            NEOX=bool(neox), BLOCK_H=_HEAD_BLOCK, BLOCK_R=max(16, triton.next_power_of_2(half)), num_warps=4,
            **extra,
            **pdl.opts(q),
        )
    except Exception as exc:  # noqa: BLE001
        raise v.launch_error(kernel, device, exc) from exc


def rope_store_(
    q: torch.Tensor,
    k: torch.Tensor,
    vals: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    neox: bool,
    *,
    freq: torch.Tensor | None = None,
) -> None:
    """``rope_(q, k, ...)`` then K/V [T, Hk, Dh] into rows ``slots`` [T] of the paged caches [NB, BS, Hk, Dh]
    (``fused.kv_store_``), in one launch: bit for bit the two (why: one launch fewer per layer and step,
    where a small model's decode step is launch-bound). The whole head is rotated (rotary_dim == head_dim;
    ``ops.rope_store_`` runs the two launches otherwise). Slots are the runner's: in range, distinct."""
    kernel = "rope_store_"
    q, k, positions, theta_f, rd = _check(q, k, positions, theta, None)
    t, _, dh = q.shape
    hk = k.shape[1]
    vals = v.tensor(kernel, "v", vals)
    slots = v.tensor(kernel, "slots", slots)
    v.check(tuple(vals.shape) == tuple(k.shape) and vals.dtype == k.dtype, kernel, "v",
            f"must be [{t}, {hk}, {dh}] {k.dtype} like k, got {tuple(vals.shape)} {vals.dtype}")
    v.check(vals.stride(2) == 1 and vals.stride(1) == dh, kernel, "v", "each token's V row must be dense")
    v.check(k.stride(1) == dh, kernel, "k", "each token's K row must be dense")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        c = v.tensor(kernel, name, c)
        v.check(c.dim() == 4 and tuple(c.shape[2:]) == (hk, dh) and c.dtype == k.dtype and c.is_contiguous(), kernel,
                name, f"must be a contiguous {k.dtype} [blocks, block_size, {hk}, {dh}], got {tuple(c.shape)} {c.dtype}")
    v.check(k_cache.shape == v_cache.shape, kernel, "v_cache", "must have k_cache's shape")
    v.shape(kernel, "slots", slots, (t,))
    v.dtype(kernel, "slots", slots, v.INDEX_DTYPES)
    v.contiguous(kernel, "slots", slots)
    table, device = _table(q, k, positions, theta_f, rd, 1.0, freq)
    v.same_device(kernel, {"q": q, "v": vals, "k_cache": k_cache, "v_cache": v_cache, "slots": slots})
    if t == 0:
        return
    _launch(q, k, positions, table, rd, neox, device, (vals, k_cache, v_cache, slots), kernel)


def rope_reference(
    x: torch.Tensor, positions: torch.Tensor, theta: float, neox: bool, rotary_dim: int | None = None,
    *, freq_scale: float = 1.0, compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Out-of-place RoPE of one tensor [T, H, Dh] (float64 by default: the ground truth)."""
    dh = x.shape[-1]
    rd = dh if rotary_dim is None else rotary_dim
    half = rd // 2
    i = torch.arange(half, dtype=torch.float64, device=x.device)
    inv_freq = freq_scale * theta ** (-2.0 * i / rd)
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cos(ang).to(compute_dtype)[:, None, :]
    sin = torch.sin(ang).to(compute_dtype)[:, None, :]
    out = x.to(compute_dtype).clone()
    if neox:
        x1, x2 = out[..., :half].clone(), out[..., half:rd].clone()
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:rd] = x2 * cos + x1 * sin
    else:
        x1, x2 = out[..., 0:rd:2].clone(), out[..., 1:rd:2].clone()
        out[..., 0:rd:2] = x1 * cos - x2 * sin
        out[..., 1:rd:2] = x2 * cos + x1 * sin
    return out
