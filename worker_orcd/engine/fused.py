"""Two small Triton kernels the model needs besides the kernel library (SPEC 4700, 4400).

``kv_write_``: store one token's K/V rows at a position read from device
memory, so the captured decode graph needs no host-side index.
``gated_act``: act(gate) * up over the fused gate/up projection in one pass.
Both validate their arguments before launching (SPEC 4400). The kernels live in
fused_kernels.py and are imported at the first launch: the checks here run in
CPU mode too, which must not need Triton (issue 10, defect 11).
"""

from __future__ import annotations

import torch

from .errors import KernelDimensionError


def check_kv_write(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
) -> None:
    _, hk, d = k_cache.shape
    if v_cache.shape != k_cache.shape or k.shape != (hk, d) or v.shape != (hk, d) or pos.numel() != 1:
        raise KernelDimensionError(
            f"kv_write: caches must match and k/v be [{hk}, {d}] with one position, got "
            f"{tuple(v_cache.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {pos.numel()}"
        )
    if not (k.is_contiguous() and v.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise KernelDimensionError("kv_write: k, v and the caches must be contiguous")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise KernelDimensionError(f"kv_write: dtype mismatch {k.dtype}/{v.dtype} vs cache {k_cache.dtype}")
    if pos.dtype not in (torch.int32, torch.int64):
        raise KernelDimensionError(f"kv_write: pos must be int32/int64, got {pos.dtype}")


def kv_write_(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
) -> None:
    """k_cache[pos] = k; v_cache[pos] = v. The caller guarantees 0 <= pos < S_max (requests are
    checked against the cache capacity before any work starts)."""
    check_kv_write(k_cache, v_cache, k, v, pos)
    import triton  # here, not at module level: the CPU mode runs without Triton

    from .fused_kernels import _kv_write_kernel

    n = k.numel()
    block = min(4096, triton.next_power_of_2(n))
    _kv_write_kernel[(triton.cdiv(n, block),)](k, v, k_cache, v_cache, pos, N=n, BLOCK=block)


def kv_store_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Each token's K/V [T, Hk, D] into row slots[t] of the paged caches [NB, BS, Hk, D]: one launch,
    slots read on the device (graph safe). Slots are the runner's (in range, distinct per step)."""
    T = k.shape[0]
    row = k_cache.shape[-2] * k_cache.shape[-1]
    if (
        v_cache.shape != k_cache.shape or k.shape != v.shape or k.dim() != 3 or k.shape[1] * k.shape[2] != row
        or slots.shape != (T,) or slots.dtype not in (torch.int32, torch.int64)
    ):
        raise KernelDimensionError(
            f"kv_store: k/v [T, Hk, D] must match the caches' rows and slots [T], got {tuple(k.shape)}, "
            f"{tuple(v.shape)}, caches {tuple(k_cache.shape)}, slots {tuple(slots.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k.stride(2) != 1 or k.stride(1) != k.shape[2] \
            or v.stride(2) != 1 or v.stride(1) != v.shape[2]:
        raise KernelDimensionError("kv_store: caches must be contiguous and each token's K/V row dense")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise KernelDimensionError(f"kv_store: dtype mismatch {k.dtype}/{v.dtype} vs cache {k_cache.dtype}")
    if T == 0:
        return
    import triton

    from .fused_kernels import _kv_store_kernel

    _kv_store_kernel[(T,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), N=row,
                           BLOCK=triton.next_power_of_2(row))


def check_gated_act(gate_up: torch.Tensor, activation: str) -> int:
    """Validate; returns f (the half width)."""
    if activation not in ("silu", "gelu_tanh"):
        raise KernelDimensionError(f"gated_act: unknown activation {activation!r}")
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.shape[0] == 0 or gate_up.stride(-1) != 1:
        raise KernelDimensionError(
            f"gated_act: gate_up must be [T, 2f] with unit column stride, got {tuple(gate_up.shape)} "
            f"stride {gate_up.stride()}"
        )
    return gate_up.shape[1] // 2


def gated_act(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for the fused [T, 2f] projection: one read of gate/up, one write."""
    f = check_gated_act(gate_up, activation)
    import triton

    from .fused_kernels import _gated_act_kernel
    from .kernels import pdl

    out = torch.empty((gate_up.shape[0], f), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(f))
    _gated_act_kernel[(gate_up.shape[0], triton.cdiv(f, block))](
        gate_up, out, f, gate_up.stride(0), out.stride(0), GELU=activation == "gelu_tanh", BLOCK=block,
        **pdl.opts(gate_up),
    )
    return out
