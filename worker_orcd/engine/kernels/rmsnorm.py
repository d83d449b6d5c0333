"""RMSNorm, and residual-add + RMSNorm fused, as one Triton program per row.

Math is fp32 whatever the storage dtype; the output has ``x``'s dtype. The
weight is multiplied as stored: GGUF converters already bake Gemma's
``(1 + w)`` into the norm weights, so no variant flag is needed here.

The fused ``add_rms_norm`` keeps the residual stream in whatever dtype the
caller allocated it in (fp32 for accuracy, or the activation dtype to halve
its traffic): the sum is rounded to that dtype first and the norm is taken of
the rounded value, so fused == ``r = (x + res).to(res.dtype); rms_norm(r)``
exactly, and switching between fused and unfused never changes a token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from . import validate as v

# Rows up to this many elements stay in registers (one read); wider rows take
# a second pass over memory that mostly hits L2.
_SINGLE_PASS_MAX = 8192
_CHUNK = 4096


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_cols,
    x_stride,
    res_stride,
    out_stride,
    res_out_stride,
    eps,
    HAS_RES: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
    GDC: tl.constexpr = False,
):
    pdl.enter(GDC)
    row = tl.program_id(0)
    x_row = x_ptr + row * x_stride
    out_row = out_ptr + row * out_stride
    res_row = res_ptr + row * res_stride
    res_out_row = res_out_ptr + row * res_out_stride
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < n_cols
        h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h = h + tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
            h = h.to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_row + cols, h, mask=mask)
            h = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(h * h, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            h = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                h = h + tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
                h = h.to(res_out_ptr.dtype.element_ty)
                tl.store(res_out_row + offs, h, mask=mask)
                h = h.to(tl.float32)
            acc += h * h
        rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / n_cols + eps)
        # Each thread re-reads exactly the elements it stored (same layout);
        # the barrier makes that independent of the layout anyway.
        tl.debug_barrier()
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            if HAS_RES:
                h = tl.load(res_out_row + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                h = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(kernel: str, name: str, t: torch.Tensor, d: int) -> tuple[torch.Tensor, int]:
    """View ``t`` as [rows, D] with unit column stride, without copying."""
    v.unit_last_stride(kernel, name, t)
    try:
        rows = t.view(-1, d)
    except RuntimeError:
        v.fail(kernel, name, f"must be viewable as [rows, {d}] without a copy (call .contiguous()), strides {t.stride()}")
    v.int32_addressable(kernel, name, rows)
    return rows, (rows.stride(0) if rows.shape[0] > 1 else d)


def _check_common(kernel: str, x: object, weight: object, eps: object) -> tuple[torch.Tensor, torch.Tensor, float]:
    x = v.tensor(kernel, "x", x)
    weight = v.tensor(kernel, "weight", weight)
    v.check(x.dim() >= 1, kernel, "x", f"must have rank >= 1, got shape {tuple(x.shape)}")
    v.positive_dims(kernel, "x", x)
    v.dtype(kernel, "x", x, v.FLOAT_DTYPES)
    v.dtype(kernel, "weight", weight, v.FLOAT_DTYPES)
    v.shape(kernel, "weight", weight, (x.shape[-1],))
    v.contiguous(kernel, "weight", weight)
    eps_f = v.finite_float(kernel, "eps", eps)
    if eps_f < 0:
        v.fail_param(kernel, "eps", f"must be >= 0, got {eps_f}")
    return x, weight, eps_f


def _out(kernel: str, name: str, out: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    out = v.tensor(kernel, name, out)
    v.shape(kernel, name, out, tuple(like.shape))
    v.check(out.dtype == dtype, kernel, name, f"dtype must be {dtype}, got {out.dtype}")
    v.contiguous(kernel, name, out)
    return out


def _config(d: int) -> tuple[bool, int, int]:
    block = triton.next_power_of_2(d)
    single = block <= _SINGLE_PASS_MAX
    if not single:
        block = _CHUNK
    warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return single, block, warps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim; ``out`` may be ``x`` (in place)."""
    kernel = "rms_norm"
    x, weight, eps_f = _check_common(kernel, x, weight, eps)
    d = x.shape[-1]
    named = {"x": x, "weight": weight} | ({} if out is None else {"out": v.tensor(kernel, "out", out)})
    device = v.same_device(kernel, named)
    out = _out(kernel, "out", out, x, x.dtype)
    v.no_overlap(kernel, "out", out, "x", x)
    x2, x_stride = _rows(kernel, "x", x, d)
    o2, o_stride = _rows(kernel, "out", out, d)
    single, block, warps = _config(d)
    try:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2, weight, o2, o2, d, x_stride, 0, o_stride, 0, eps_f,
            HAS_RES=False, SINGLE=single, BLOCK=block, num_warps=warps,
            **pdl.opts(x2),
        )
    except Exception as exc:  # noqa: BLE001 - any launch failure becomes a typed error
        raise v.launch_error(kernel, device, exc) from exc
    return out


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = (x + residual)`` stored in ``residual.dtype``; returns ``(rms_norm(r), r)`` in one pass.

    ``residual_out`` may be ``residual`` itself and ``out`` may be ``x``: the
    decode step updates its residual stream in place without a new buffer.
    """
    kernel = "add_rms_norm"
    x, weight, eps_f = _check_common(kernel, x, weight, eps)
    residual = v.tensor(kernel, "residual", residual)
    v.shape(kernel, "residual", residual, tuple(x.shape))
    v.dtype(kernel, "residual", residual, v.FLOAT_DTYPES)
    d = x.shape[-1]
    named = {"x": x, "residual": residual, "weight": weight}
    named |= {} if out is None else {"out": v.tensor(kernel, "out", out)}
    named |= {} if residual_out is None else {"residual_out": v.tensor(kernel, "residual_out", residual_out)}
    device = v.same_device(kernel, named)
    out = _out(kernel, "out", out, x, x.dtype)
    residual_out = _out(kernel, "residual_out", residual_out, residual, residual.dtype)
    v.no_overlap(kernel, "out", out, "x", x)
    v.no_overlap(kernel, "out", out, "residual", residual)
    v.no_overlap(kernel, "residual_out", residual_out, "residual", residual)
    v.no_overlap(kernel, "residual_out", residual_out, "x", x)
    v.check(out.data_ptr() != residual_out.data_ptr(), kernel, "out", "must not alias residual_out")
    x2, x_stride = _rows(kernel, "x", x, d)
    r2, r_stride = _rows(kernel, "residual", residual, d)
    o2, o_stride = _rows(kernel, "out", out, d)
    ro2, ro_stride = _rows(kernel, "residual_out", residual_out, d)
    single, block, warps = _config(d)
    try:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, o2, ro2, d, x_stride, r_stride, o_stride, ro_stride, eps_f,
            HAS_RES=True, SINGLE=single, BLOCK=block, num_warps=warps,
            **pdl.opts(x2),
        )
    except Exception as exc:  # noqa: BLE001
        raise v.launch_error(kernel, device, exc) from exc
    return out, residual_out


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Plain torch RMSNorm (tests use ``compute_dtype=torch.float64`` as ground truth)."""
    h = x.to(compute_dtype)
    rstd = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (h * rstd * weight.to(compute_dtype)).to(x.dtype if compute_dtype == torch.float32 else compute_dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, compute_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused definition ``add_rms_norm`` must reproduce."""
    r = (x.to(torch.float32) + residual.to(torch.float32)).to(residual.dtype)
    normed = rms_norm_reference(r, weight, eps, compute_dtype=compute_dtype)
    if compute_dtype == torch.float32:
        normed = normed.to(x.dtype)
    return normed, r
