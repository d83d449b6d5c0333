"""Causal GQA attention kernels: prefill and split-K decode vs a float64 reference (SPEC 4700, 4400, 4711)."""

from __future__ import annotations


import pytest
import torch

from worker_orcd.engine.errors import KernelDimensionError, KernelParamError
from worker_orcd.engine.kernels.attention import attention_decode, attention_prefill, attention_reference
from kernel_testing import TOL, randn, rel









# (T, q_offset, Hq, Hk, D, window, dtype): GQA ratios 1/2/7, head dims 64/128/256, odd lengths.
PREFILL_CASES = [
    (37, 0, 4, 4, 64, None, torch.float32),
    (37, 19, 4, 2, 64, None, torch.float32),
    (23, 5, 7, 1, 128, None, torch.float32),
    (41, 0, 14, 2, 64, 16, torch.float32),
    (33, 40, 4, 2, 256, None, torch.float32),
    (17, 9, 2, 1, 256, 5, torch.bfloat16),
    (45, 3, 4, 2, 128, None, torch.float16),
    (1, 50, 7, 1, 64, None, torch.bfloat16),
    (40, 0, 4, 4, 80, 1, torch.float32),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"T{c[0]}-off{c[1]}-{c[2]}x{c[3]}-D{c[4]}-w{c[5]}-{str(c[6])[6:]}")
def test_worker_4700_prefill_matches_float64(gen: torch.Generator, device: str, case: tuple) -> None:
    t, q_offset, hq, hk, d, window, dtype = case
    s = q_offset + t
    q = randn(gen, t, hq, d, dtype=dtype, device=device)
    k = randn(gen, s, hk, d, dtype=dtype, device=device)
    v = randn(gen, s, hk, d, dtype=dtype, device=device)
    out = torch.full((t, hq, d), float("nan"), dtype=dtype, device=device)
    got = attention_prefill(q, k, v, d**-0.5, sliding_window=window, q_offset=q_offset, out=out)
    assert got is out and torch.isfinite(out).all()
    ref = attention_reference(q, k, v, d**-0.5, sliding_window=window, q_offset=q_offset)
    assert rel(out, ref) < TOL[dtype], rel(out, ref)


def test_worker_4700_prefill_never_reads_past_the_causal_range(gen: torch.Generator, device: str) -> None:
    """Cache rows past q_offset + T may hold garbage (NaN): the result must not change."""
    t, q_offset, d = 21, 13, 64
    q = randn(gen, t, 4, d, dtype=torch.float32, device=device)
    k = randn(gen, 64, 2, d, dtype=torch.float32, device=device)
    v = randn(gen, 64, 2, d, dtype=torch.float32, device=device)
    clean = attention_prefill(q, k[: q_offset + t], v[: q_offset + t], 0.125, q_offset=q_offset)
    k[q_offset + t :] = float("nan")
    v[q_offset + t :] = float("nan")
    dirty = attention_prefill(q, k, v, 0.125, q_offset=q_offset)
    assert torch.equal(clean, dirty)


def test_worker_4700_prefill_accepts_strided_qkv_views(gen: torch.Generator, device: str) -> None:
    t, hq, hk, d = 19, 4, 2, 64
    qkv = randn(gen, t, (hq + 2 * hk) * d, dtype=torch.float32, device=device)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d :].view(t, hk, d)
    ref = attention_reference(q, k, v, 0.125)
    assert rel(attention_prefill(q, k, v, 0.125), ref) < 1e-5


# (seq_len, S_max, Hq, Hk, D, window, split_size, dtype)
DECODE_CASES = [
    (77, 100, 6, 2, 64, None, None, torch.float32),
    (77, 100, 6, 2, 64, None, 16, torch.float32),
    (100, 100, 7, 1, 128, 20, 16, torch.float32),
    (1, 64, 4, 4, 64, None, 16, torch.float32),
    (50, 130, 2, 1, 256, None, 32, torch.float32),
    (63, 90, 14, 2, 64, 9, 32, torch.bfloat16),
    (90, 90, 4, 2, 128, None, 16, torch.float16),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"n{c[0]}-smax{c[1]}-{c[2]}x{c[3]}-D{c[4]}-w{c[5]}-split{c[6]}-{str(c[7])[6:]}")
def test_worker_4700_decode_matches_prefill_last_row(gen: torch.Generator, device: str, case: tuple) -> None:
    """seq_len comes from a device tensor; rows past it are NaN and must never be read."""
    n, s_max, hq, hk, d, window, split, dtype = case
    k_cache = randn(gen, s_max, hk, d, dtype=dtype, device=device)
    v_cache = randn(gen, s_max, hk, d, dtype=dtype, device=device)
    k_cache[n:] = float("nan")
    v_cache[n:] = float("nan")
    q_all = randn(gen, n, hq, d, dtype=dtype, device=device)
    prefill = attention_prefill(q_all, k_cache[:n], v_cache[:n], d**-0.5, sliding_window=window)
    seq_len = torch.tensor([n], dtype=torch.int32, device=device)
    out = torch.full((hq, d), float("nan"), dtype=dtype, device=device)
    got = attention_decode(q_all[-1], k_cache, v_cache, seq_len, d**-0.5, sliding_window=window, out=out, split_size=split)
    assert got is out and torch.isfinite(out).all()
    ref = attention_reference(q_all[-1:], k_cache[:n], v_cache[:n], d**-0.5, sliding_window=window, q_offset=n - 1)[0]
    assert rel(out, ref) < TOL[dtype], rel(out, ref)
    assert rel(out, prefill[-1]) < TOL[dtype] * 2


def test_worker_4700_decode_seq_len_is_read_from_device_memory(gen: torch.Generator, device: str) -> None:
    """One seq_len tensor updated in place between calls (what a captured decode graph replays)."""
    k_cache = randn(gen, 80, 2, 64, dtype=torch.float32, device=device)
    v_cache = randn(gen, 80, 2, 64, dtype=torch.float32, device=device)
    q = randn(gen, 4, 64, dtype=torch.float32, device=device)
    seq_len = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.empty(4, 64, device=device)
    for n in (5, 33, 80):
        seq_len.fill_(n)
        attention_decode(q, k_cache, v_cache, seq_len, 0.125, out=out, split_size=16)
        ref = attention_reference(q[None], k_cache[:n], v_cache[:n], 0.125, q_offset=n - 1)[0]
        assert rel(out, ref) < 1e-5


def test_worker_4711_attention_deterministic(gen: torch.Generator, device: str) -> None:
    q = randn(gen, 29, 8, 128, dtype=torch.bfloat16, device=device)
    k = randn(gen, 29, 2, 128, dtype=torch.bfloat16, device=device)
    v = randn(gen, 29, 2, 128, dtype=torch.bfloat16, device=device)
    assert torch.equal(attention_prefill(q, k, v, 0.1), attention_prefill(q, k, v, 0.1))
    seq_len = torch.tensor([29], dtype=torch.int32, device=device)
    a = attention_decode(q[-1], k, v, seq_len, 0.1, split_size=16)
    b = attention_decode(q[-1], k, v, seq_len, 0.1, split_size=16)
    assert torch.equal(a, b)


def test_worker_4400_prefill_rejects_bad_dimensions(device: str) -> None:
    q = torch.randn(5, 4, 64, device=device)
    k = torch.randn(5, 2, 64, device=device)
    v = torch.randn(5, 2, 64, device=device)
    cases = [
        (lambda: attention_prefill(q[0], k, v, 0.1), "q"),
        (lambda: attention_prefill(q, k[0], v, 0.1), "k"),
        (lambda: attention_prefill(q, torch.randn(5, 3, 64, device=device), torch.randn(5, 3, 64, device=device), 0.1), "k"),
        (lambda: attention_prefill(q, torch.randn(5, 2, 32, device=device), torch.randn(5, 2, 32, device=device), 0.1), "k"),
        (lambda: attention_prefill(q, k, torch.randn(5, 2, 32, device=device), 0.1), "v"),
        (lambda: attention_prefill(q, k, v.half(), 0.1), "v"),
        (lambda: attention_prefill(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), 0.1), "q"),
        (lambda: attention_prefill(q, k, v, 0.1, q_offset=1), "k"),
        (lambda: attention_prefill(q, k, v, 0.1, q_offset=-1), "q_offset"),
        (lambda: attention_prefill(q, k, v, 0.1, sliding_window=0), "sliding_window"),
        (lambda: attention_prefill(torch.randn(0, 4, 64, device=device), k, v, 0.1), "q"),
        (lambda: attention_prefill(torch.randn(5, 4, 320, device=device), torch.randn(5, 2, 320, device=device),
                                   torch.randn(5, 2, 320, device=device), 0.1), "q"),
        (lambda: attention_prefill(q, k, v, 0.1, out=torch.empty(5, 4, 32, device=device)), "out"),
        (lambda: attention_prefill(q, k.to("meta"), v, 0.1), "k"),
    ]
    for call, arg in cases:
        with pytest.raises(KernelDimensionError) as info:
            call()
        assert info.value.kernel == "attention_prefill" and info.value.argument == arg, str(info.value)
    with pytest.raises(KernelParamError, match="scale"):
        attention_prefill(q, k, v, 0.0)


def test_worker_4400_decode_rejects_bad_dimensions(device: str) -> None:
    q = torch.randn(4, 64, device=device)
    kc = torch.randn(32, 2, 64, device=device)
    vc = torch.randn(32, 2, 64, device=device)
    n = torch.tensor([8], dtype=torch.int32, device=device)
    cases = [
        (lambda: attention_decode(q[None], kc, vc, n, 0.1), "q"),
        (lambda: attention_decode(torch.randn(3, 64, device=device), kc, vc, n, 0.1), "k_cache"),
        (lambda: attention_decode(torch.randn(4, 32, device=device), kc, vc, n, 0.1), "k_cache"),
        (lambda: attention_decode(q, kc, vc[:16], n, 0.1), "v_cache"),
        (lambda: attention_decode(q, kc, vc, torch.tensor([8.0], device=device), 0.1), "seq_len"),
        (lambda: attention_decode(q, kc, vc, torch.tensor([8, 9], dtype=torch.int32, device=device), 0.1), "seq_len"),
        (lambda: attention_decode(q, kc, vc, 8, 0.1), "seq_len"),  # type: ignore[arg-type]
        (lambda: attention_decode(q, kc, vc, n, 0.1, out=torch.empty(4, 64, dtype=torch.float16, device=device)), "out"),
        (lambda: attention_decode(q, kc, vc, n, 0.1, split_size=24), "split_size"),
        (lambda: attention_decode(q, kc, vc, n, 0.1, out=[[0.0] * 64] * 4), "out"),  # type: ignore[arg-type]
        (lambda: attention_decode(q, kc, vc, n, 0.1, sliding_window=-2), "sliding_window"),
        (lambda: attention_decode(q, torch.randn(0, 2, 64, device=device), torch.randn(0, 2, 64, device=device), n, 0.1), "k_cache"),
    ]
    for call, arg in cases:
        with pytest.raises(KernelDimensionError) as info:
            call()
        assert info.value.kernel == "attention_decode" and info.value.argument == arg, str(info.value)


@pytest.mark.parametrize("bad", [33, 0, -3, 2**31 - 1])
def test_worker_4420_decode_seq_len_out_of_range(gen: torch.Generator, device: str, bad: int) -> None:
    """Host-resident seq_len is range-checked; a device-resident one (checking would cost a sync per
    layer) is clamped to [1, S_max] inside the kernels: wrong numbers, but never an out-of-bounds read."""
    q = randn(gen, 4, 64, dtype=torch.float32, device=device)
    kc = randn(gen, 32, 2, 64, dtype=torch.float32, device=device)
    vc = randn(gen, 32, 2, 64, dtype=torch.float32, device=device)
    seq_len = torch.tensor([bad], dtype=torch.int32, device=device)
    if seq_len.device.type == "cpu":
        with pytest.raises(KernelDimensionError, match="seq_len") as info:
            attention_decode(q, kc, vc, seq_len, 0.1)
        assert info.value.argument == "seq_len" and "S_max=32" in str(info.value)
        return
    clamped = torch.tensor([min(max(bad, 1), 32)], dtype=torch.int32, device=device)
    assert torch.equal(attention_decode(q, kc, vc, seq_len, 0.1), attention_decode(q, kc, vc, clamped, 0.1))


# ---- real GPU only ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hk", [(64, 14, 2), (128, 12, 2), (256, 8, 4)])
def test_worker_4700_prefill_and_decode_large_gpu(gen: torch.Generator, device: str, d: int, hq: int, hk: int) -> None:
    t, q_offset = 1500, 2596
    s = q_offset + t
    q = randn(gen, t, hq, d, dtype=torch.bfloat16, device=device)
    k = randn(gen, s, hk, d, dtype=torch.bfloat16, device=device)
    v = randn(gen, s, hk, d, dtype=torch.bfloat16, device=device)
    for window in (None, 1024):
        out = attention_prefill(q, k, v, d**-0.5, q_offset=q_offset, sliding_window=window)
        ref = attention_reference(q, k, v, d**-0.5, q_offset=q_offset, sliding_window=window, compute_dtype=torch.float32)
        assert rel(out, ref) < 1e-2
        k_cache = torch.full((32768, hk, d), float("nan"), dtype=torch.bfloat16, device=device)
        v_cache = torch.full_like(k_cache, float("nan"))
        k_cache[:s], v_cache[:s] = k, v
        seq_len = torch.tensor([s], dtype=torch.int32, device=device)
        dec = attention_decode(q[-1], k_cache, v_cache, seq_len, d**-0.5, sliding_window=window)
        assert rel(dec, ref[-1]) < 1e-2


@pytest.mark.gpu
def test_worker_4700_decode_cuda_graph_replays_with_new_seq_len(gen: torch.Generator, device: str) -> None:
    """The decode kernels capture into a CUDA graph; replay follows seq_len updated in device memory."""
    hq, hk, d, s_max = 12, 2, 128, 4096
    k_cache = randn(gen, s_max, hk, d, dtype=torch.bfloat16, device=device)
    v_cache = randn(gen, s_max, hk, d, dtype=torch.bfloat16, device=device)
    q = randn(gen, hq, d, dtype=torch.bfloat16, device=device)
    seq_len = torch.tensor([10], dtype=torch.int32, device=device)
    out = torch.empty(hq, d, dtype=torch.bfloat16, device=device)
    attention_decode(q, k_cache, v_cache, seq_len, d**-0.5, out=out)  # warm-up: compile outside capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        attention_decode(q, k_cache, v_cache, seq_len, d**-0.5, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    for n in (1, 700, 4096):
        seq_len.fill_(n)
        graph.replay()
        eager = attention_decode(q, k_cache, v_cache, seq_len, d**-0.5)
        assert torch.equal(out, eager)
        ref = attention_reference(q[None], k_cache[:n], v_cache[:n], d**-0.5, q_offset=n - 1)[0]
        assert rel(out, ref) < 1e-2
