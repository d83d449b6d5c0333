"""CPU dev mode's ``ops.linear`` / ``ops.logits_fp32``: a row's result is bitwise independent of the
batch size and of the row's position in the batch (the batching engine's CI tests rest on it)."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.engine import ops

SHAPES = [(64, 96), (896, 1152), (151, 37), (1536, 256), (4864, 896)]


@pytest.mark.parametrize(("K", "N"), SHAPES)
def test_worker_4711_cpu_linear_rows_batch_invariant(gen: torch.Generator, K: int, N: int) -> None:
    w = torch.randn(N, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    pool = torch.randn(64, K, generator=gen)
    full = ops.linear(pool, w, bias)
    for M in (1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 47, 64):
        idx = torch.randperm(64, generator=gen)[:M]
        got = ops.linear(pool[idx], w, bias)
        assert torch.equal(got, full[idx]), f"M={M}: rows differ from the same rows at M=64"
        assert torch.equal(ops.logits_fp32(pool[idx], w), ops.logits_fp32(pool, w)[idx])
    # and it is the matrix product
    ref = pool.double() @ w.double().t() + bias.double()
    assert ((full.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_worker_4711_cpu_linear_plain_matmul_is_not_invariant(gen: torch.Generator) -> None:
    """Why the blocking exists: one [M, K] BLAS call changes rows' bits with M (so this test can fail)."""
    w = torch.randn(1152, 896, generator=gen)
    pool = torch.randn(64, 896, generator=gen)
    full = pool @ w.t()
    differs = sum(not torch.equal(pool[:M] @ w.t(), full[:M]) for M in (1, 3, 5, 8, 13, 17, 33))
    if differs == 0:
        pytest.skip("this BLAS happens to be batch invariant for these shapes")
    assert differs > 0


def test_worker_4711_cpu_linear_3d_and_shapes(gen: torch.Generator) -> None:
    w = torch.randn(40, 24, generator=gen)
    x = torch.randn(2, 3, 24, generator=gen)
    y = ops.linear(x, w)
    assert y.shape == (2, 3, 40)
    assert torch.equal(y.reshape(6, 40), ops.linear(x.reshape(6, 24), w))
    with pytest.raises(RuntimeError):
        ops.linear(torch.randn(3, 25), w)
