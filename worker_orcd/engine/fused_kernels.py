"""The Triton kernels behind fused.py's two primitives; imported at their first launch only.

Kept apart from fused.py's argument checks, which the CPU mode runs too, so that
the CPU mode never imports Triton (issue 10, defect 11).
"""

import triton
import triton.language as tl

from .kernels import pdl


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    # One token's K and V rows ([Hk*D] each) into row `pos` of the caches.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = tl.load(pos_ptr).to(tl.int64) * N
    tl.store(kc_ptr + row + offs, tl.load(k_ptr + offs, mask=mask), mask=mask)
    tl.store(vc_ptr + row + offs, tl.load(v_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _gated_act_kernel(gu_ptr, out_ptr, f, gu_stride, out_stride, GELU: tl.constexpr, BLOCK: tl.constexpr,
                      GDC: tl.constexpr = False):
    pdl.enter(GDC)
    # out[t, i] = act(gu[t, i]) * gu[t, f + i], math in fp32
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < f
    g = tl.load(gu_ptr + row * gu_stride + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * gu_stride + f + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:  # 0.5 g (1 + tanh(y)) == g * sigmoid(2y), y = sqrt(2/pi) (g + 0.044715 g^3)
        a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    else:
        a = g * tl.sigmoid(g)
    tl.store(out_ptr + row * out_stride + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_store_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_stride, v_stride, N: tl.constexpr, BLOCK: tl.constexpr):
    # Token t's K and V rows ([Hk*D] each) into cache row slots[t] of the paged caches.
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    row = tl.load(slot_ptr + t).to(tl.int64) * N
    tl.store(kc_ptr + row + offs, tl.load(k_ptr + t * k_stride + offs, mask=mask), mask=mask)
    tl.store(vc_ptr + row + offs, tl.load(v_ptr + t * v_stride + offs, mask=mask), mask=mask)
