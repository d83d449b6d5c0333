"""Quantized matmul at prefill sizes (kernels/qmatmul_prefill.py): the dequantize-to-scratch path computes
``segments_reference`` exactly (every tiled type, with and without K segments and bias), which on the
GPU is ``qmatmul_tiled``'s rows bit for bit (the ``gpu`` tests check both, and that ``qmatmul``'s rows
do not change across the PREFILL_MIN_M threshold). On the CPU the Triton kernels run in the
interpreter, whose dots (numpy) round differently for different tilings, so there the fused kernel
is compared with float64 only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_qmatmul import TILED, make_resident
from worker_orcd.engine.kernels import qmatmul_prefill as prefill
from worker_orcd.engine.kernels import qmatmul_tiled as tiled
from worker_orcd.engine.kernels.qmatmul import qlinear, qmatmul
from worker_orcd.engine.qweight import WeightGroup
from worker_orcd.gguf.constants import GGMLType


@pytest.mark.parametrize("t", TILED, ids=lambda t: t.name)
# one segment; several (k_segments); a narrow deep shape that the dense kernel would split along K
@pytest.mark.parametrize(("n", "k"), [(48, 256), (24, 1536), (24, 2304)])
def test_worker_4711_prefill_path_equals_the_tiled_rows(t: GGMLType, n: int, k: int, gen: torch.Generator,
                                                        device: str) -> None:
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    w, wf = make_resident(t, n, k, rng, device)
    assert (tiled.k_segments(n, k)[1] > 1) == (k > 256)
    x = torch.randn(40, k, generator=gen).to(device=device, dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=torch.float16)
    w16 = w.dequantize(torch.float32).to(device=device, dtype=torch.float16)
    for b in (None, bias):
        got = torch.full((40, n), float("nan"), dtype=torch.float16, device=device)
        prefill.qmatmul_dequant(x, w, b, got)
        assert torch.equal(got, tiled.segments_reference(x, w16, b)), t.name
        exact = x.double() @ w16.double().T + (0 if b is None else b.double())
        assert float((got.double() - exact).abs().max()) <= 2e-3 * float(exact.abs().max()), t.name
        if device == "cuda":  # the fused kernel's rows, bit for bit (tiled vs dense wgmma chains: RESULTS)
            want = torch.empty(40, n, dtype=torch.float16, device=device)
            tiled.qmatmul_tiled(x, w, b, want, swap=False)
            assert torch.equal(got, want), t.name
    # and what it dequantizes is exactly the file's values, rounded once
    ks, _ = tiled.k_segments(n, k)
    seg = prefill.segment_weight(w, ks, min(k, 2 * ks), torch.float32) if k > ks else prefill.segment_weight(w, 0, k, torch.float32)
    lo = ks if k > ks else 0
    assert torch.equal(seg.cpu(), wf.float()[:, lo : lo + seg.shape[1]].cpu())


def test_worker_4711_prefill_path_in_a_mixed_group_and_fp32_out(gen: torch.Generator, device: str) -> None:
    """A Q4_K_M-style group (Q4_K and Q6_K parts) into one output, and the fp32 logits form."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    a, _ = make_resident(GGMLType.Q4_K, 32, 512, rng, device)
    b, _ = make_resident(GGMLType.Q6_K, 16, 512, rng, device)
    x = torch.randn(20, 512, generator=gen).to(device=device, dtype=torch.float16)
    a16, b16 = (p.dequantize(torch.float32).to(device=device, dtype=torch.float16) for p in (a, b))
    for out_dtype in (torch.float16, torch.float32):
        got = torch.empty(20, 48, dtype=out_dtype, device=device)
        prefill.qmatmul_dequant(x, a, None, got[:, :32])
        prefill.qmatmul_dequant(x, b, None, got[:, 32:])
        if out_dtype == torch.float16:
            assert torch.equal(got, torch.cat([tiled.segments_reference(x, a16), tiled.segments_reference(x, b16)], 1))
        if device == "cuda":
            want = torch.empty_like(got)
            tiled.qmatmul_tiled(x, a, None, want[:, :32], swap=False)
            tiled.qmatmul_tiled(x, b, None, want[:, 32:], swap=False)
            assert torch.equal(got, want)
    assert torch.equal(got.half(), torch.cat([tiled.segments_reference(x, a16), tiled.segments_reference(x, b16)], 1))
    assert qlinear(x, WeightGroup((a, b))).shape == (20, 48)


def test_worker_4711_segment_weight_refuses_a_cut_block(gen: torch.Generator, device: str) -> None:
    rng = np.random.default_rng(0)
    w, _ = make_resident(GGMLType.Q4_K, 8, 512, rng, device)
    with pytest.raises(ValueError, match="not whole blocks"):
        prefill.segment_weight(w, 128, 512, torch.float16)


@pytest.mark.gpu
def test_worker_4711_gpu_qmatmul_dispatch_is_invariant_across_the_threshold(gen: torch.Generator, device: str) -> None:
    """qmatmul below and above PREFILL_MIN_M: a row's bits do not depend on the batch it came in."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    for t, (n, k) in ((GGMLType.Q4_K, (512, 4096)), (GGMLType.Q6_K, (3584, 18944 // 2 // 256 * 256)), (GGMLType.Q8_0, (1024, 896))):
        w, _ = make_resident(t, n, k, rng, device)
        pool = torch.randn(prefill.PREFILL_MIN_M + 40, k, generator=gen).to(device=device, dtype=torch.float16)
        big = qmatmul(pool, w)  # the dequantize-to-scratch path
        for m in (1, 17, 64, 200, prefill.PREFILL_MIN_M - 1):
            assert torch.equal(qmatmul(pool[:m], w), big[:m]), (t.name, m)


@pytest.mark.parametrize("t", sorted(tiled.HALF2_TYPES), ids=lambda t: t.name)
def test_worker_4711_half2_weight_takes_the_half2_values_on_both_paths(t: GGMLType, gen: torch.Generator, device: str) -> None:
    """A QWeight with ``half2``: the prefill path's scratch is ``half2_dequant`` — the fused kernels' own
    code, equal to the ``half2_weight`` reference bit for bit — and its rows are the segment chains on
    those values (on the GPU the fused kernel's rows too, and qmatmul's at every M: the gpu test below)."""
    import dataclasses

    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    w, _ = make_resident(t, 24, 1536, rng, device)
    wh = dataclasses.replace(w, half2=True)
    ref = tiled.half2_weight(w)
    assert torch.equal(tiled.half2_dequant(wh), ref)
    assert not torch.equal(ref, w.dequantize(torch.float32).to(device=device, dtype=torch.float16))  # can fail
    x = torch.randn(40, 1536, generator=gen).to(device=device, dtype=torch.float16)
    got = torch.empty(40, 24, dtype=torch.float16, device=device)
    prefill.qmatmul_dequant(x, wh, None, got)
    assert torch.equal(got, tiled.segments_reference(x, ref))
    if device == "cuda":
        want = torch.empty_like(got)
        tiled.qmatmul_tiled(x, wh, None, want, swap=False)  # half2 from the weight
        assert torch.equal(got, want)


def test_worker_4711_half2_is_refused_where_it_does_not_exist(gen: torch.Generator, device: str) -> None:
    import dataclasses

    from worker_orcd.engine.errors import KernelDimensionError

    rng = np.random.default_rng(0)
    q8, _ = make_resident(GGMLType.Q8_0, 8, 512, rng, device)
    with pytest.raises(ValueError, match="half2 is for Q4_K and Q6_K"):
        dataclasses.replace(q8, half2=True)
    with pytest.raises(KernelDimensionError, match="half2"):
        tiled.half2_dequant(q8)


@pytest.mark.gpu
def test_worker_4711_gpu_half2_dispatch_is_invariant_across_the_threshold(gen: torch.Generator, device: str) -> None:
    """The quantized-half2 residency's weights through qmatmul below and above PREFILL_MIN_M: the same bits."""
    import dataclasses

    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    for t, (n, k) in ((GGMLType.Q4_K, (512, 4096)), (GGMLType.Q6_K, (3584, 18944 // 2 // 256 * 256))):
        w, _ = make_resident(t, n, k, rng, device)
        w = dataclasses.replace(w, half2=True)
        pool = torch.randn(prefill.PREFILL_MIN_M + 40, k, generator=gen).to(device=device, dtype=torch.float16)
        big = qmatmul(pool, w)  # the dequantize-to-scratch path, half2_dequant
        assert torch.equal(big, tiled.segments_reference(pool, tiled.half2_weight(w))), t.name
        for m in (1, 17, 64, 200, prefill.PREFILL_MIN_M - 1):
            assert torch.equal(qmatmul(pool[:m], w), big[:m]), (t.name, m)
