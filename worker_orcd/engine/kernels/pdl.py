"""Programmatic dependent launch (Hopper, sm_90+): the decode step's kernels overlap their launch.

A step is ~300 short kernels (a 1.5B decode step: 1.9 ms, ~6 µs a kernel), so the gap between one kernel's
last program and the next one's first is a large share of it. A kernel launched with PDL may be scheduled
while the kernel before it in the stream is still running; ``enter`` (its first statement) waits until
that kernel has completed and its writes are visible (``griddepcontrol.wait``), then lets the next kernel
launch (``griddepcontrol.launch_dependents``). Nothing is read or written before the wait, so the order of
every memory access is the one without PDL: the arithmetic, and every row's bits, are unchanged; only the
launch latency overlaps. CUDA graphs keep the programmatic edges. A fragment-order matmul does one thing
before its wait where ``PREFETCH`` is set (off: measured slower): it asks L2 for the weight bytes it is about
to stream (constant since the load).

``ON`` switches it off for A/B runs (``profile_step.py --pdl off``); it applies where the device is sm_90+
and Triton has the ``gdc`` intrinsics, never on the CPU (the interpreter).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

ON = True
# with PDL, a fragment-order matmul may first ask L2 for the weight bytes it will read (they never depend on the
# kernel before it), then wait. Off: measured slower than PDL alone (H200, graph replay B=1: 1.5B Q4_K_M 1.715 vs
# 1.687 ms, 7B 3.457 vs 3.239 ms; RESULTS, seventeenth session); ``profile_step.py --pdl prefetch`` turns it on
PREFETCH = False
_capable: dict[int, bool] = {}


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL."""
    if not ON or t.device.type != "cuda":
        return False
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _capable:
        cuda = getattr(getattr(tl, "extra", None), "cuda", None)
        _capable[idx] = (torch.cuda.get_device_capability(idx)[0] >= 9
                         and hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents"))
    return _capable[idx]


def opts(t: torch.Tensor) -> dict[str, Any]:
    """A launch's PDL arguments for a kernel whose first statement is ``enter(GDC)``: ``kernel[grid](...,
    **pdl.opts(x))`` (nothing when off, so the interpreter never sees the option)."""
    return {"GDC": True, "launch_pdl": True} if enabled(t) else {}


def prefetch_opts(t: torch.Tensor) -> dict[str, Any]:
    """``opts`` plus ``PREFETCH`` for a kernel that prefetches its constant weights before ``enter``."""
    o = opts(t)
    return {**o, "PREFETCH": True} if o and PREFETCH else o


@triton.jit
def prefetch_l2(ptrs, mask):
    """``prefetch.global.L2`` of each address where ``mask`` (the lines a program will load; no register
    is written, nothing waits for them)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def enter(GDC: tl.constexpr):
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
