"""RoPE kernel (llama interleaved and neox, configurable base) vs a float64 reference (SPEC 4700, 4400, 4711)."""

from __future__ import annotations


import pytest
import torch

from worker_orcd.engine.errors import KernelDimensionError, KernelParamError
from worker_orcd.engine import ops
from worker_orcd.engine.fused import kv_store_
from worker_orcd.engine.kernels.rope import freq_table, rope_, rope_reference, rope_store_
from kernel_testing import TOL, randn, rel









@pytest.mark.parametrize("neox", [False, True], ids=["llama", "neox"])
@pytest.mark.parametrize("theta", [10000.0, 500000.0, 1000000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_worker_4700_rope_matches_float64(gen: torch.Generator, device: str, neox: bool, theta: float, dtype: torch.dtype) -> None:
    """Positions up to 2^17 (long context) keep fp32 within 1e-5: the angle is range-reduced exactly."""
    t, hq, hk, dh = 11, 6, 2, 64
    q = randn(gen, t, hq, dh, dtype=dtype, device=device)
    k = randn(gen, t, hk, dh, dtype=dtype, device=device)
    positions = torch.randint(0, 2**17, (t,), generator=gen).to(device)
    positions[0] = 0
    q_ref = rope_reference(q, positions, theta, neox)
    k_ref = rope_reference(k, positions, theta, neox)
    rope_(q, k, positions, theta, neox)
    assert rel(q, q_ref) < TOL[dtype], rel(q, q_ref)
    assert rel(k, k_ref) < TOL[dtype], rel(k, k_ref)


@pytest.mark.parametrize("dh", [64, 128, 256])
@pytest.mark.parametrize("neox", [False, True], ids=["llama", "neox"])
def test_worker_4700_rope_head_dims_int32_positions(gen: torch.Generator, device: str, dh: int, neox: bool) -> None:
    t = 7
    q = randn(gen, t, 4, dh, dtype=torch.float32, device=device)
    k = randn(gen, t, 1, dh, dtype=torch.float32, device=device)
    positions = torch.randint(0, 4096, (t,), generator=gen, dtype=torch.int32).to(device)
    q_ref, k_ref = rope_reference(q, positions, 10000.0, neox), rope_reference(k, positions, 10000.0, neox)
    rope_(q, k, positions, 10000.0, neox)
    assert rel(q, q_ref) < 1e-5 and rel(k, k_ref) < 1e-5


@pytest.mark.parametrize("neox", [False, True], ids=["llama", "neox"])
def test_worker_4700_rope_partial_rotary_dim(gen: torch.Generator, device: str, neox: bool) -> None:
    """Dims past rotary_dim pass through bit-for-bit."""
    q = randn(gen, 5, 4, 128, dtype=torch.float32, device=device)
    k = randn(gen, 5, 2, 128, dtype=torch.float32, device=device)
    q0, k0 = q.clone(), k.clone()
    positions = torch.randint(0, 1000, (5,), generator=gen).to(device)
    rope_(q, k, positions, 10000.0, neox, rotary_dim=32)
    assert rel(q, rope_reference(q0, positions, 10000.0, neox, 32)) < 1e-5
    assert rel(k, rope_reference(k0, positions, 10000.0, neox, 32)) < 1e-5
    assert torch.equal(q[..., 32:], q0[..., 32:]) and torch.equal(k[..., 32:], k0[..., 32:])


def test_worker_4700_rope_linear_freq_scale(gen: torch.Generator, device: str) -> None:
    """Linear RoPE scaling: freq_scale = 1/8 rotates position p exactly like p/8 unscaled."""
    q = randn(gen, 6, 4, 64, dtype=torch.float32, device=device)
    k = randn(gen, 6, 1, 64, dtype=torch.float32, device=device)
    positions = (torch.randint(0, 5000, (6,), generator=gen) * 8).to(device)
    q_ref = rope_reference(q, positions, 1e6, True, freq_scale=0.125)
    assert rel(q_ref, rope_reference(q, positions // 8, 1e6, True)) < 1e-12
    rope_(q, k, positions, 1e6, True, freq_scale=0.125)
    assert rel(q, q_ref) < 1e-5
    with pytest.raises(KernelParamError, match="freq_scale"):
        rope_(q, k, positions, 1e6, True, freq_scale=0.0)


def test_worker_4700_rope_on_fused_qkv_views(gen: torch.Generator, device: str) -> None:
    """q and k as strided views of one [T, (Hq+2Hk)*Dh] projection; v stays untouched."""
    t, hq, hk, dh = 6, 14, 2, 64
    qkv = randn(gen, t, (hq + 2 * hk) * dh, dtype=torch.bfloat16, device=device)
    before = qkv.clone()
    q = qkv[:, : hq * dh].view(t, hq, dh)
    k = qkv[:, hq * dh : (hq + hk) * dh].view(t, hk, dh)
    positions = torch.arange(30, 30 + t).to(device)
    rope_(q, k, positions, 1000000.0, True)
    assert rel(q, rope_reference(before[:, : hq * dh].view(t, hq, dh), positions, 1e6, True)) < 1e-2
    assert rel(k, rope_reference(before[:, hq * dh : (hq + hk) * dh].view(t, hk, dh), positions, 1e6, True)) < 1e-2
    assert torch.equal(qkv[:, (hq + hk) * dh :], before[:, (hq + hk) * dh :])


def test_worker_4700_rope_position_zero_is_identity_and_variants_differ(gen: torch.Generator, device: str) -> None:
    q = randn(gen, 2, 2, 64, dtype=torch.float32, device=device)
    k = randn(gen, 2, 2, 64, dtype=torch.float32, device=device)
    q_llama, k_llama, q_neox, k_neox = q.clone(), k.clone(), q.clone(), k.clone()
    zero = torch.zeros(2, dtype=torch.int64, device=device)
    rope_(q_llama, k_llama, zero, 10000.0, False)
    assert torch.equal(q_llama, q) and torch.equal(k_llama, k)
    pos = torch.tensor([3, 17], device=device)
    rope_(q_llama, k_llama, pos, 10000.0, False)
    rope_(q_neox, k_neox, pos, 10000.0, True)
    assert not torch.allclose(q_llama, q_neox)


def test_worker_4711_rope_deterministic(gen: torch.Generator, device: str) -> None:
    q = randn(gen, 9, 8, 128, dtype=torch.bfloat16, device=device)
    k = randn(gen, 9, 2, 128, dtype=torch.bfloat16, device=device)
    positions = torch.randint(0, 30000, (9,), generator=gen).to(device)
    q2, k2 = q.clone(), k.clone()
    rope_(q, k, positions, 10000.0, False)
    rope_(q2, k2, positions, 10000.0, False)
    assert torch.equal(q, q2) and torch.equal(k, k2)


def test_worker_4400_rope_rejects_bad_dimensions(device: str) -> None:
    q = torch.randn(4, 8, 64, device=device)
    k = torch.randn(4, 2, 64, device=device)
    pos = torch.arange(4, device=device)
    cases = [
        (lambda: rope_(q[0], k, pos, 1e4, False), "q"),
        (lambda: rope_(q, k[0], pos, 1e4, False), "k"),
        (lambda: rope_(q, torch.randn(3, 2, 64, device=device), pos, 1e4, False), "k"),
        (lambda: rope_(q, torch.randn(4, 2, 32, device=device), pos, 1e4, False), "k"),
        (lambda: rope_(q, k.half(), pos, 1e4, False), "k"),
        (lambda: rope_(q.to(torch.int32), k.to(torch.int32), pos, 1e4, False), "q"),
        (lambda: rope_(q, k, pos.float(), 1e4, False), "positions"),
        (lambda: rope_(q, k, pos[:3], 1e4, False), "positions"),
        (lambda: rope_(q, k, pos.view(2, 2), 1e4, False), "positions"),
        (lambda: rope_(torch.randn(0, 8, 64, device=device), torch.randn(0, 2, 64, device=device), pos[:0], 1e4, False), "q"),
        (lambda: rope_(q, k, pos, 1e4, False, rotary_dim=33), "rotary_dim"),
        (lambda: rope_(q, k, pos, 1e4, False, rotary_dim=128), "rotary_dim"),
        (lambda: rope_(q, k, pos, 1e4, False, rotary_dim=0), "rotary_dim"),
        (lambda: rope_(q, q, pos, 1e4, False), "k"),
        (lambda: rope_(q, k, pos.to("meta"), 1e4, False), "positions"),
        (lambda: rope_(torch.randn(4, 64, 8, device=device).transpose(1, 2), k, pos, 1e4, False), "q"),
    ]
    for call, arg in cases:
        with pytest.raises(KernelDimensionError) as info:
            call()
        assert info.value.kernel == "rope_" and info.value.argument == arg, str(info.value)
    for theta in (1.0, -5.0, float("nan")):
        with pytest.raises(KernelParamError, match="theta"):
            rope_(q, k, pos, theta, False)


@pytest.mark.gpu
@pytest.mark.parametrize("neox", [False, True], ids=["llama", "neox"])
def test_worker_4700_rope_long_prefill_gpu(gen: torch.Generator, device: str, neox: bool) -> None:
    t = 8192
    q = randn(gen, t, 32, 128, dtype=torch.float32, device=device)
    k = randn(gen, t, 8, 128, dtype=torch.float32, device=device)
    positions = torch.arange(t, device=device) + 100000
    q_ref, k_ref = rope_reference(q, positions, 500000.0, neox), rope_reference(k, positions, 500000.0, neox)
    rope_(q, k, positions, 500000.0, neox)
    assert rel(q, q_ref) < 1e-5 and rel(k, k_ref) < 1e-5


def _qkv_cache(gen: torch.Generator, device: str, dtype: torch.dtype, t: int = 5, hq: int = 14, hk: int = 2, dh: int = 64,
               blocks: int = 6, bs: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused QKV output [T, (hq + 2 hk) dh], paged caches full of other rows' values, distinct slots, positions."""
    qkv = randn(gen, t, (hq + 2 * hk) * dh, dtype=dtype, device=device)
    kc = randn(gen, blocks, bs, hk, dh, dtype=dtype, device=device)
    vc = randn(gen, blocks, bs, hk, dh, dtype=dtype, device=device)
    slots = torch.randperm(blocks * bs, generator=gen)[:t].to(device)
    positions = torch.randint(0, 40_000, (t,), generator=gen).to(device)
    return qkv, kc, vc, slots, positions


def _split(qkv: torch.Tensor, hq: int = 14, hk: int = 2, dh: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = qkv.shape[0]
    return (qkv[:, : hq * dh].reshape(t, hq, dh), qkv[:, hq * dh : (hq + hk) * dh].reshape(t, hk, dh),
            qkv[:, (hq + hk) * dh :].reshape(t, hk, dh))


@pytest.mark.parametrize("neox", [False, True], ids=["llama", "neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_worker_4711_rope_store_is_rope_then_kv_store(gen: torch.Generator, device: str, neox: bool, dtype: torch.dtype) -> None:
    """One launch, bit for bit ``rope_`` then ``kv_store_`` on views of a fused QKV output (GQA): q and k
    rotated in place, the rotated K and V in their slots, every other cache row untouched."""
    qkv, kc, vc, slots, positions = _qkv_cache(gen, device, dtype)
    table = freq_table(1e6, 64, torch.device(device))
    want, kc1, vc1 = qkv.clone(), kc.clone(), vc.clone()
    q, k, v = _split(want)
    rope_(q, k, positions, 1e6, neox, freq=table)
    kv_store_(kc1, vc1, k, v, slots)
    got, kc2, vc2 = qkv.clone(), kc.clone(), vc.clone()
    q, k, v = _split(got)
    rope_store_(q, k, v, kc2, vc2, slots, positions, 1e6, neox, freq=table)
    assert torch.equal(got, want) and torch.equal(kc2, kc1) and torch.equal(vc2, vc1)
    assert not torch.equal(kc2, kc) and not torch.equal(vc2, vc)  # it wrote something
    rows = torch.ones(kc.shape[0] * kc.shape[1], dtype=torch.bool, device=device)
    rows[slots] = False
    assert torch.equal(kc2.flatten(0, 1)[rows], kc.flatten(0, 1)[rows])
    assert torch.equal(vc2.flatten(0, 1)[rows], vc.flatten(0, 1)[rows])


def test_worker_4700_ops_rope_store_partial_rotary_takes_two_launches(gen: torch.Generator, device: str) -> None:
    """A partial rotary_dim (the fused kernel rotates whole heads) runs rope_ then kv_store_: the same result."""
    qkv, kc, vc, slots, positions = _qkv_cache(gen, device, torch.float32)
    want, kc1, vc1 = qkv.clone(), kc.clone(), vc.clone()
    q, k, v = _split(want)
    rope_(q, k, positions, 1e4, True, 32)
    kv_store_(kc1, vc1, k, v, slots)
    ops.use_kernels_on_cpu(True)
    try:
        got, kc2, vc2 = qkv.clone(), kc.clone(), vc.clone()
        q, k, v = _split(got)
        ops.rope_store_(q, k, v, kc2, vc2, slots, positions, 1e4, True, 32)
    finally:
        ops.use_kernels_on_cpu(False)
    assert torch.equal(got, want) and torch.equal(kc2, kc1) and torch.equal(vc2, vc1)


def test_worker_4400_rope_store_rejects_bad_input(gen: torch.Generator, device: str) -> None:
    qkv, kc, vc, slots, positions = _qkv_cache(gen, device, torch.float16)
    q, k, v = _split(qkv)
    with pytest.raises(KernelDimensionError, match="argument 'v'"):
        rope_store_(q, k, v[:, :1], kc, vc, slots, positions, 1e4, False)
    with pytest.raises(KernelDimensionError, match="argument 'k_cache'"):
        rope_store_(q, k, v, kc.float(), vc, slots, positions, 1e4, False)
    with pytest.raises(KernelDimensionError, match="argument 'v_cache'"):
        rope_store_(q, k, v, kc, vc[:2], slots, positions, 1e4, False)
    with pytest.raises(KernelDimensionError, match="argument 'slots'"):
        rope_store_(q, k, v, kc, vc, slots[:2], positions, 1e4, False)
    with pytest.raises(KernelDimensionError, match="argument 'slots'"):
        rope_store_(q, k, v, kc, vc, slots.float(), positions, 1e4, False)
    with pytest.raises(KernelParamError, match="theta"):
        rope_store_(q, k, v, kc, vc, slots, positions, 0.5, False)
