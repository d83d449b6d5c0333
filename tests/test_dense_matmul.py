"""Dense-weight matmul (kernels/matmul_dense.py): exact, batch invariant, split-K reduced in a fixed order.

Oracle: float64 matmul. Batch invariance: a row's result is bitwise identical whatever M is and
wherever the row sits, with and without a K split (the split depends on the weight's shape only).
On the CPU the kernel runs in Triton's interpreter with the row-wise dot model of test_qmatmul;
the ``gpu`` tests repeat it compiled on the real Qwen2.5 shapes.
"""

from __future__ import annotations

import pytest
import torch

from kernel_testing import rel
from test_qmatmul import rowwise_dot  # noqa: F401 - fixture
from worker_orcd.engine.errors import KernelDimensionError
from worker_orcd.engine.kernels.matmul_dense import (
    WIDE_MIN_M,
    dense_matmul,
    lock_slots,
    split_k,
    split_size,
    wide_config,
)


def test_worker_4701_split_depends_on_the_shape_only() -> None:
    assert split_k(151_936, 896) == 1  # a head fills the GPU by columns
    assert split_k(896, 4864) > 1  # 0.5B down: 28 column tiles of 32 cannot
    assert split_k(896, 600) == 1  # too short to split
    for k, s in ((896, 2), (4864, 8), (18_944, 4)):
        ks = split_size(k, s)
        assert ks % 128 == 0 and ks * s >= k and ks * (s - 1) < k


@pytest.mark.parametrize(("n", "k", "splits"), [(40, 320, 1), (40, 1280, 4), (33, 600, 2)])
def test_worker_4701_dense_matmul_matches_float64(
    n: int, k: int, splits: int, gen: torch.Generator, device: str
) -> None:
    dt = torch.float16
    w = (torch.randn(n, k, generator=gen) * 0.05).to(device=device, dtype=dt)
    x = torch.randn(7, k, generator=gen).to(device=device, dtype=dt)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=dt)
    locks = torch.zeros(lock_slots(n), dtype=torch.int32, device=device)
    y = dense_matmul(x, w, bias, locks=locks, splits=splits)
    ref = x.double() @ w.double().t() + bias.double()
    assert y.dtype == dt and rel(y, ref) < 2e-3
    y32 = dense_matmul(x, w, locks=locks, splits=splits, out_dtype=torch.float32)
    assert y32.dtype == torch.float32 and rel(y32, ref - bias.double()) < 1e-5
    assert int(locks.abs().sum()) == 0, "a launch must leave its split counters zeroed"
    assert torch.equal(dense_matmul(x, w, bias, locks=locks, splits=splits), y), "not deterministic"


@pytest.mark.parametrize("splits", [1, 3])
def test_worker_4711_dense_matmul_batch_invariant(
    rowwise_dot: None, splits: int, gen: torch.Generator, device: str  # noqa: F811
) -> None:
    n, k = 48, 768
    w = (torch.randn(n, k, generator=gen) * 0.05).to(device=device, dtype=torch.float16)
    pool = torch.randn(40, k, generator=gen).to(device=device, dtype=torch.float16)
    full = dense_matmul(pool, w, splits=splits)
    for m in (1, 2, 16, 17, 33):
        idx = torch.randperm(40, generator=gen)[:m].to(device)
        assert torch.equal(dense_matmul(pool[idx], w, splits=splits), full[idx]), f"M={m}"


def test_worker_4711_wide_tile_rows_equal_the_16_row_kernel(
    rowwise_dot: None, gen: torch.Generator, device: str  # noqa: F811
) -> None:
    """The wide-tile kernel (taken from WIDE_MIN_M rows) is exact and gives each row the 16-row
    kernel's bits, K a multiple of the tile's BK or not, with a bias; a split shape never takes it."""
    for n, k in ((48, 768), (40, 200)):
        w = (torch.randn(n, k, generator=gen) * 0.05).to(device=device, dtype=torch.float16)
        bias = torch.randn(n, generator=gen).to(device=device, dtype=torch.float16)
        pool = torch.randn(40, k, generator=gen).to(device=device, dtype=torch.float16)
        narrow = dense_matmul(pool, w, bias, splits=1, wide=False)
        wide = dense_matmul(pool, w, bias, splits=1, wide=True)
        assert rel(wide, pool.double() @ w.double().t() + bias.double()) < 2e-3
        assert torch.equal(wide, narrow), f"n={n} k={k}"
    assert wide_config(4096, 4096, 2) is None and wide_config(WIDE_MIN_M - 1, 4096, 1) is None
    assert wide_config(WIDE_MIN_M, 4096, 1) is not None
    assert wide_config(17, 4608, 1) == (64, 32, 128, 4, 3) and wide_config(16, 4608, 1) is None
    assert wide_config(48, 37888, 1) == (64, 128, 64, 4, 3) and wide_config(48, 9728, 1) == (64, 64, 64, 4, 4)


@pytest.mark.parametrize("flat", [False, True])
def test_worker_4711_segmented_chains_are_the_segments_added_in_order(gen: torch.Generator, device: str,
                                                                       flat: bool) -> None:
    """``segment=`` (the quantized prefill path): a chain per K segment from zero, the chains added in
    segment order, bias, one rounding -- bit for bit the per-segment launches it replaces, a short last
    segment included; a row's bits do not depend on M; one loop (``seg_flat``) or a loop per segment."""
    n, k, seg = 48, 640, 256
    w = (torch.randn(n, k, generator=gen) * 0.05).to(device=device, dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=torch.float16)
    x = torch.randn(40, k, generator=gen).to(device=device, dtype=torch.float16)
    for b, dt in ((None, torch.float16), (bias, torch.float16), (None, torch.float32)):
        got = dense_matmul(x, w, b, segment=seg, out_dtype=dt, seg_flat=flat)
        acc = None
        for lo in range(0, k, seg):
            p = dense_matmul(x[:, lo:lo + seg].contiguous(), w[:, lo:lo + seg].contiguous(), splits=1, wide=True,
                             out_dtype=torch.float32)
            acc = p if acc is None else acc + p
        assert acc is not None
        assert torch.equal(got, (acc if b is None else acc + b.float()).to(dt))
        assert rel(got, x.double() @ w.double().t() + (0 if b is None else b.double())) < 2e-3
        assert torch.equal(dense_matmul(x[:17], w, b, segment=seg, out_dtype=dt, seg_flat=flat), got[:17])
    # in fp32 the segmented sum is visibly not the one chain (the test would see a kernel ignoring segment=)
    assert not torch.equal(got, dense_matmul(x, w, wide=True, out_dtype=torch.float32))
    with pytest.raises(KernelDimensionError, match="multiple of 256"):
        dense_matmul(x, w, segment=100)
    with pytest.raises(KernelDimensionError, match="unsplit wide"):
        dense_matmul(x, w, segment=256, wide=False)


def test_worker_4400_dense_matmul_bad_input_rejected(device: str) -> None:
    w = torch.zeros(8, 64, dtype=torch.float16, device=device)
    x = torch.zeros(2, 64, dtype=torch.float16, device=device)
    with pytest.raises(KernelDimensionError, match="K = 64"):
        dense_matmul(torch.zeros(2, 32, dtype=torch.float16, device=device), w)
    with pytest.raises(KernelDimensionError, match="dtype"):
        dense_matmul(x, w.float())
    with pytest.raises(KernelDimensionError, match="locks"):
        dense_matmul(x, w, locks=torch.zeros(0, dtype=torch.int32, device=device))
    with pytest.raises(KernelDimensionError, match="shape"):
        dense_matmul(x, w, out=torch.empty(2, 9, dtype=torch.float16, device=device))


SHAPES = [(1152, 896), (896, 896), (9728, 896), (896, 4864), (4608, 3584), (3584, 18944), (37888, 3584)]


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=str)
def test_worker_4711_gpu_dense_matmul_invariant_real_shapes(n: int, k: int, dt: torch.dtype, gen: torch.Generator,
                                                          device: str) -> None:
    """Compiled, the real Qwen2.5 0.5B/7B shapes (split and unsplit): rows at M = 1..1100 bitwise equal
    to the same rows at M = 1100 (with a split, more row groups than row programs), under every
    launch configuration the tuner may pick, exact to float64."""
    from worker_orcd.engine.kernels.matmul_dense import launch_config

    w = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=dt)
    pool = torch.randn(1100, k, generator=gen).to(device=device, dtype=dt)
    locks = torch.zeros(lock_slots(n), dtype=torch.int32, device=device)
    full = dense_matmul(pool, w, locks=locks)
    assert rel(full, pool.double() @ w.double().t()) < (2e-3 if dt == torch.float16 else 1e-2)
    for m in (1, 2, 7, 16, 17, 33, 64, 100, 128, 256, 599, 1099):
        idx = torch.randperm(1100, generator=gen)[:m].to(device)
        assert torch.equal(dense_matmul(pool[idx], w, locks=locks), full[idx]), f"M={m}"
        other = launch_config(1100 if m < 100 else 1, n, split_k(n, k))  # another M's configuration on these rows
        assert torch.equal(dense_matmul(pool[:m], w, locks=locks, config=other), full[:m]), f"M={m} config"
    assert int(locks.abs().sum()) == 0
