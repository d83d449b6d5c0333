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
):
    tok = tl.program_id(0)
    blk = tl.program_id(1)
    n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    is_q = blk < n_q_blocks
    head0 = tl.where(is_q, blk, blk - n_q_blocks) * BLOCK_H
    n_heads = tl.where(is_q, n_q_heads, n_k_heads)
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
    tl.store(base + row + off1[None, :], (x1 * cos - x2 * sin).to(base.dtype.element_ty), mask=mask)
    tl.store(base + row + off2[None, :], (x2 * cos + x1 * sin).to(base.dtype.element_ty), mask=mask)


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
    device = v.same_device("rope_", {"q": q, "k": k, "positions": positions})
    scale = v.finite_float("rope_", "freq_scale", freq_scale)
    if scale <= 0:
        v.fail_param("rope_", "freq_scale", f"must be > 0, got {scale}")
    if freq is None:
        table = freq_table(theta_f, rd, device, scale)
    else:
        table = v.tensor("rope_", "freq", freq)
        v.check(tuple(table.shape) == (2, rd // 2) and table.dtype == torch.float32 and table.device == device
                and table.is_contiguous(), "rope_", "freq", f"must be fp32 [2, {rd // 2}] on {device}")
    half = rd // 2
    t, hq, _ = q.shape
    hk = k.shape[1]
    grid = (t, triton.cdiv(hq, _HEAD_BLOCK) + triton.cdiv(hk, _HEAD_BLOCK))
    try:
        _rope_kernel[grid](
            q, k, positions, table, hq, hk,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), half,
            NEOX=bool(neox), BLOCK_H=_HEAD_BLOCK, BLOCK_R=max(16, triton.next_power_of_2(half)), num_warps=4,
        )
    except Exception as exc:  # noqa: BLE001
        raise v.launch_error("rope_", device, exc) from exc


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
