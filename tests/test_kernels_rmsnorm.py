"""RMSNorm / fused residual-add RMSNorm kernels vs a float64 reference (SPEC 4700, 4400, 4711)."""

from __future__ import annotations


import pytest
import torch

from worker_orcd.engine.errors import KernelDimensionError, KernelParamError
from worker_orcd.engine.kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_reference
from kernel_testing import TOL, randn, rel









@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 896), (3, 5, 1536), (2, 9000)])
def test_worker_4700_rms_norm_matches_float64(gen: torch.Generator, device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Covers the single-pass path and (D=9000) the two-pass path; the poisoned ``out`` must be fully written."""
    x = randn(gen, *shape, dtype=dtype, device=device) * 3
    for w_dtype in {torch.float32, dtype}:
        w = randn(gen, shape[-1], dtype=w_dtype, device=device)
        out = torch.full_like(x, float("nan"))
        got = rms_norm(x, w, 1e-6, out=out)
        assert got is out
        assert torch.isfinite(out).all()
        ref = rms_norm_reference(x, w, 1e-6, compute_dtype=torch.float64)
        assert rel(out, ref) < TOL[dtype], (w_dtype, rel(out, ref))


def test_worker_4700_rms_norm_eps_matters(gen: torch.Generator, device: str) -> None:
    x = randn(gen, 4, 128, device=device) * 1e-3
    w = randn(gen, 128, device=device)
    for eps in (1e-6, 1e-2):
        assert rel(rms_norm(x, w, eps), rms_norm_reference(x, w, eps, compute_dtype=torch.float64)) < 1e-5


def test_worker_4700_rms_norm_in_place(gen: torch.Generator, device: str) -> None:
    x = randn(gen, 5, 256, device=device)
    w = randn(gen, 256, device=device)
    expected = rms_norm(x, w, 1e-5)
    rms_norm(x, w, 1e-5, out=x)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("res_dtype", ["fp32", "act"])
@pytest.mark.parametrize("d", [96, 9000])
def test_worker_4700_add_rms_norm_equals_unfused(
    gen: torch.Generator, device: str, act: torch.dtype, res_dtype: str, d: int
) -> None:
    """The residual is the float64 sum rounded to its dtype; the norm is taken of that rounded value
    (bit-identical to the unfused kernel when the residual has the activation dtype)."""
    r_dtype = torch.float32 if res_dtype == "fp32" else act
    x = randn(gen, 3, d, dtype=act, device=device)
    residual = randn(gen, 3, d, dtype=r_dtype, device=device) * 4
    w = randn(gen, d, dtype=act, device=device)
    out = torch.full_like(x, float("nan"))
    res_out = torch.full_like(residual, float("nan"))
    normed, new_res = add_rms_norm(x, residual, w, 1e-6, out=out, residual_out=res_out)
    assert normed is out and new_res is res_out
    assert new_res.dtype == r_dtype and normed.dtype == act
    assert rel(new_res, x.double() + residual.double()) < TOL[r_dtype]
    if r_dtype == act:
        assert torch.equal(normed, rms_norm(new_res, w, 1e-6))
    assert rel(normed, rms_norm_reference(new_res, w, 1e-6, compute_dtype=torch.float64)) < TOL[act]


def test_worker_4700_add_rms_norm_in_place_residual(gen: torch.Generator, device: str) -> None:
    x = randn(gen, 2, 512, dtype=torch.float16, device=device)
    residual = randn(gen, 2, 512, device=device)
    w = randn(gen, 512, dtype=torch.float16, device=device)
    expected_norm, expected_res = add_rms_norm(x, residual.clone(), w, 1e-5)
    normed, new_res = add_rms_norm(x, residual, w, 1e-5, residual_out=residual)
    assert new_res is residual
    assert torch.equal(residual, expected_res) and torch.equal(normed, expected_norm)


def test_worker_4711_rms_norm_deterministic(gen: torch.Generator, device: str) -> None:
    x = randn(gen, 9, 1024, dtype=torch.bfloat16, device=device)
    r = randn(gen, 9, 1024, device=device)
    w = randn(gen, 1024, dtype=torch.bfloat16, device=device)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6))
    a, b = add_rms_norm(x, r, w, 1e-6), add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_worker_4400_rms_norm_rejects_bad_dimensions(device: str) -> None:
    x = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    cases = [
        (lambda: rms_norm(x, torch.randn(63, device=device), 1e-6), "weight"),
        (lambda: rms_norm(x, torch.randn(1, 64, device=device), 1e-6), "weight"),
        (lambda: rms_norm(torch.randn(0, 64, device=device), w, 1e-6), "x"),
        (lambda: rms_norm(torch.randn((), device=device), w, 1e-6), "x"),
        (lambda: rms_norm(x.to(torch.int32), w, 1e-6), "x"),
        (lambda: rms_norm(x, w.to(torch.int64), 1e-6), "weight"),
        (lambda: rms_norm(x, w, 1e-6, out=torch.empty(4, 64, dtype=torch.float16, device=device)), "out"),
        (lambda: rms_norm(x, w, 1e-6, out=torch.empty(4, 65, device=device)), "out"),
        (lambda: rms_norm(torch.randn(64, 8, device=device).t(), torch.randn(64, device=device), 1e-6), "x"),
        (lambda: rms_norm(x, w.to("meta"), 1e-6), "weight"),
        (lambda: rms_norm(x, [1.0] * 64, 1e-6), "weight"),  # type: ignore[arg-type]
        (lambda: rms_norm(x, w, 1e-6, out="x"), "out"),  # type: ignore[arg-type]
        (lambda: add_rms_norm(x, torch.randn(4, 32, device=device), w, 1e-6), "residual"),
        (lambda: add_rms_norm(x, x.to(torch.int32), w, 1e-6), "residual"),
    ]
    for call, arg in cases:
        with pytest.raises(KernelDimensionError) as info:
            call()
        assert info.value.kernel in ("rms_norm", "add_rms_norm") and info.value.argument == arg, str(info.value)
        assert arg in str(info.value)


def test_worker_4400_rms_norm_rejects_bad_eps(device: str) -> None:
    x = torch.randn(2, 8, device=device)
    w = torch.ones(8, device=device)
    for eps in (-1e-6, float("nan"), float("inf")):
        with pytest.raises(KernelParamError, match="eps"):
            rms_norm(x, w, eps)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_worker_4700_rms_norm_large_gpu(gen: torch.Generator, device: str, dtype: torch.dtype) -> None:
    x = randn(gen, 4096, 8192, dtype=dtype, device=device)
    r = randn(gen, 4096, 8192, device=device)
    w = randn(gen, 8192, dtype=dtype, device=device)
    assert rel(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6, compute_dtype=torch.float64)) < 1e-2
    normed, new_res = add_rms_norm(x, r, w, 1e-6)
    assert rel(new_res, x.double() + r.double()) < 1e-6
    assert rel(normed, rms_norm_reference(new_res, w, 1e-6, compute_dtype=torch.float64)) < 1e-2
    same, same_res = add_rms_norm(x, r.to(dtype), w, 1e-6)
    assert torch.equal(same, rms_norm(same_res, w, 1e-6))
