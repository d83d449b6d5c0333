"""The paged attention kernel (prefill chunks and decode rows in one launch) vs a float64 reference,
plus its batch invariance on the GPU (SPEC 4700, 4710; issue 8)."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.engine import ops
from worker_orcd.engine.errors import EngineError
from worker_orcd.engine.kernels.attention_paged import paged_attention
from worker_orcd.engine.kernels.paged_layout import tile_shape
from worker_orcd.engine.runner import AttentionMeta
from kernel_testing import TOL, randn, rel

BS = 16


def build(rows: list[tuple[int, int]], hq: int, hk: int, n_blocks: int, gen: torch.Generator, device: str):  # noqa: ANN201
    """rows: (start, qlen) per row. Random block tables (distinct blocks per row, shuffled)."""
    perm = torch.randperm(n_blocks, generator=gen).tolist()
    tables, host_rows, tile_row, tile_q0 = [], [], [], []
    qstart = 0
    _, block_t = tile_shape(hq, hk)
    for r, (start, qlen) in enumerate(rows):
        need = -(-(start + qlen) // BS)
        tables.append([perm.pop() for _ in range(need)])
        host_rows.append((qstart, qlen, start))
        for q0 in range(0, qlen, block_t):
            tile_row.append(r)
            tile_q0.append(q0)
        qstart += qlen
    width = max(len(t) for t in tables)
    bt = torch.zeros((len(rows), width), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)

    def i32(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32, device=device)

    meta = AttentionMeta(
        bt.to(device), i32(tile_row), i32(tile_q0), i32([q for q, _, _ in host_rows]),
        i32([n for _, n, _ in host_rows]), i32([s for _, _, s in host_rows]), host_rows, tables,
    )
    return meta, qstart


CASES = [
    # rows (start, qlen), Hq, Hk, D, window, dtype
    ([(0, 37)], 4, 2, 64, None, torch.float32),
    ([(0, 1), (40, 1), (3, 1)], 14, 2, 64, None, torch.float32),  # decode rows, GQA 7
    ([(0, 20), (35, 1), (16, 9), (100, 3)], 4, 4, 128, None, torch.float32),  # mixed prefill + decode
    ([(0, 30), (50, 1)], 2, 1, 256, 8, torch.float32),  # sliding window (Gemma 3 local layers)
    ([(0, 33), (17, 1)], 14, 2, 64, None, torch.float16),
    ([(5, 12), (64, 1)], 4, 1, 128, 16, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}rows-{c[1]}x{c[2]}-D{c[3]}-w{c[4]}-{str(c[5])[6:]}")
def test_worker_4700_paged_attention_matches_float64(gen: torch.Generator, device: str, case: tuple) -> None:
    rows, hq, hk, d, window, dtype = case
    n_blocks = sum(-(-(s + n) // BS) for s, n in rows) + 5
    meta, T = build(rows, hq, hk, n_blocks, gen, device)
    kc = randn(gen, n_blocks, BS, hk, d, dtype=dtype, device=device)
    vc = randn(gen, n_blocks, BS, hk, d, dtype=dtype, device=device)
    q = randn(gen, T, hq, d, dtype=dtype, device=device)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    paged_attention(
        q, kc, vc, meta.block_tables, meta.tile_row, meta.tile_q0, meta.row_qstart, meta.row_qlen, meta.row_start,
        scale, sliding_window=window, out=out,
    )
    assert torch.isfinite(out).all(), "every query row must be written"
    ref = ops.paged_attention(q.cpu().double(), kc.cpu().double(), vc.cpu().double(), meta, scale, sliding_window=window)
    assert rel(out.cpu(), ref) < TOL[dtype], rel(out.cpu(), ref)


def test_worker_4700_paged_attention_rejects_bad_shapes(device: str) -> None:
    q = torch.zeros(4, 6, 64, device=device)
    kc = torch.zeros(3, BS, 4, 64, device=device)  # 6 heads over 4 kv heads
    z = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(EngineError, match="not a multiple"):
        paged_attention(q, kc, kc, z[None], z, z, z, z + 4, z, 0.1)
    with pytest.raises(EngineError, match="int32"):
        paged_attention(q[:, :4], kc, kc, z[None].long(), z, z, z, z + 4, z, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_worker_4710_paged_attention_batch_invariant(gen: torch.Generator, device: str, dtype: torch.dtype) -> None:
    """A decode row, or a prefill chunk's token, gives bitwise the same output alone, among other rows,
    at another place in the batch, or inside a differently chunked prompt."""
    hq, hk, d = 28, 4, 128
    n_blocks = 4096  # every row of every layout gets its own blocks from build()
    kc = randn(gen, n_blocks, BS, hk, d, dtype=dtype, device=device)
    vc = randn(gen, n_blocks, BS, hk, d, dtype=dtype, device=device)
    table = torch.randperm(n_blocks, generator=gen)[:40].tolist()
    n = 300
    q_all = randn(gen, n, hq, d, dtype=dtype, device=device)

    def run(layout: list[tuple[int, int]], extra: int, split: bool = False) -> torch.Tensor:
        """layout: chunks (start, qlen) of the same sequence, plus ``extra`` unrelated decode rows first."""
        rows = [(int(torch.randint(0, 200, (1,), generator=gen)), 1) for _ in range(extra)] + layout
        meta, T = build(rows, hq, hk, n_blocks, gen, device)
        tables = torch.zeros((len(rows), max(len(table), meta.block_tables.shape[1])), dtype=torch.int32, device=device)
        tables[:, : meta.block_tables.shape[1]] = meta.block_tables
        for i in range(extra, len(rows)):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        qs = [randn(gen, 1, hq, d, dtype=dtype, device=device) for _ in range(extra)]
        qs += [q_all[s : s + ln] for s, ln in layout]
        q = torch.cat(qs)
        sp = _split_scratch(meta, hq, hk, d, dtype, device) if split else None
        out = paged_attention(q, kc, vc, tables, meta.tile_row, meta.tile_q0, meta.row_qstart, meta.row_qlen,
                              meta.row_start, d**-0.5, split=sp)
        if sp is not None:  # the merging programs left every counter at zero: the scratch serves the next layer as is
            assert not sp[3].any()
            again = paged_attention(q, kc, vc, tables, meta.tile_row, meta.tile_q0, meta.row_qstart, meta.row_qlen,
                                    meta.row_start, d**-0.5, split=sp)
            assert torch.equal(again, out)
        return out[extra:]

    whole = run([(0, n)], 0)
    assert torch.equal(run([(0, 100), (100, 77), (177, 123)], 5), whole)
    assert torch.equal(run([(s, 1) for s in range(250, 300)], 30)[-50:], whole[250:])
    assert torch.equal(run([(0, 299), (299, 1)], 63)[-1:], whole[-1:])
    # the split + merge passes (decode steps of few rows): the same bits
    assert torch.equal(run([(s, 1) for s in range(250, 300)], 3, split=True)[-50:], whole[250:])
    assert torch.equal(run([(299, 1)], 0, split=True), whole[-1:])
    assert torch.equal(run([(0, 100), (100, 77), (177, 123)], 2, split=True), whole)


def _split_scratch(meta: AttentionMeta, hq: int, hk: int, d: int, dtype: torch.dtype, device: str):  # noqa: ANN202
    """(slot0, ml, acc, locks) for ``meta``'s tiles: each tile gets the splits up to its last position."""
    from worker_orcd.engine.kernels.paged_layout import split_keys

    s = split_keys(d, dtype.itemsize)
    g_pad, block_t = tile_shape(hq, hk)
    slot0, n = [], 0
    for r, q0 in zip(meta.tile_row.tolist(), meta.tile_q0.tolist(), strict=True):
        _, qlen, start = meta.host_rows[r]
        last = start + min(q0 + block_t, qlen) - 1
        slot0.append(n)
        n += last // s + 1
    bm, bd = g_pad * block_t, max(16, 1 << (d - 1).bit_length())
    ml = torch.full((n + 3, hk, 2, bm), float("nan"), device=device)
    acc = torch.full((n + 3, hk, bm, bd), float("nan"), device=device)
    locks = torch.zeros(len(slot0) * hk, dtype=torch.int32, device=device)
    return torch.tensor(slot0, dtype=torch.int32, device=device), ml, acc, locks


SPLIT_CASES = [
    # rows (start, qlen), Hq, Hk, D, window, dtype: rows reaching several splits (S = 32 keys in fp32, 128 in 16-bit)
    ([(0, 1), (40, 1), (97, 1), (3, 1)], 14, 2, 64, None, torch.float32),  # decode rows, GQA 7
    ([(0, 20), (35, 1), (16, 9), (100, 3)], 4, 4, 128, None, torch.float32),  # mixed prefill + decode
    ([(0, 30), (70, 1), (5, 40)], 2, 1, 256, 8, torch.float32),  # sliding window: early splits fully masked
    ([(0, 33), (300, 1), (140, 2)], 14, 2, 64, None, torch.float16),
    ([(5, 12), (260, 1)], 4, 1, 128, 40, torch.bfloat16),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"{len(c[0])}rows-{c[1]}x{c[2]}-D{c[3]}-w{c[4]}-{str(c[5])[6:]}")
def test_worker_4710_split_pass_equals_one_pass(gen: torch.Generator, device: str, case: tuple) -> None:
    """The split + merge passes give bitwise the one-pass kernel's output (the same reduction order),
    and both match float64."""
    rows, hq, hk, d, window, dtype = case
    n_blocks = sum(-(-(s + n) // BS) for s, n in rows) + 5
    meta, T = build(rows, hq, hk, n_blocks, gen, device)
    kc = randn(gen, n_blocks, BS, hk, d, dtype=dtype, device=device)
    vc = randn(gen, n_blocks, BS, hk, d, dtype=dtype, device=device)
    q = randn(gen, T, hq, d, dtype=dtype, device=device)
    args = (q, kc, vc, meta.block_tables, meta.tile_row, meta.tile_q0, meta.row_qstart, meta.row_qlen, meta.row_start,
            d**-0.5)
    one = paged_attention(*args, sliding_window=window)
    split = _split_scratch(meta, hq, hk, d, dtype, device)
    two = paged_attention(*args, sliding_window=window, split=split)
    assert torch.equal(one, two)
    assert not split[3].any()  # the merge counters are zero again: the next layer (graph replay) reuses them
    assert torch.equal(paged_attention(*args, sliding_window=window, split=split), two)
    ref = ops.paged_attention(q.cpu().double(), kc.cpu().double(), vc.cpu().double(), meta, d**-0.5, sliding_window=window)
    assert rel(two.cpu(), ref) < TOL[dtype], rel(two.cpu(), ref)


def test_worker_4700_split_scratch_rejects_bad_shapes(gen: torch.Generator, device: str) -> None:
    meta, T = build([(0, 1)], 4, 2, 4, gen, device)
    kc = torch.zeros(4, BS, 2, 64, device=device)
    q = torch.zeros(T, 4, 64, device=device)
    slot0, ml, acc, locks = _split_scratch(meta, 4, 2, 64, torch.float32, device)
    args = (q, kc, kc, meta.block_tables, meta.tile_row, meta.tile_q0, meta.row_qstart, meta.row_qlen, meta.row_start, 0.1)
    with pytest.raises(EngineError, match="split acc"):
        paged_attention(*args, split=(slot0, ml, acc[:, :, :, :32], locks))
    with pytest.raises(EngineError, match="int32"):
        paged_attention(*args, split=(slot0.long(), ml, acc, locks))
    with pytest.raises(EngineError, match="as many slots"):
        paged_attention(*args, split=(slot0, ml, acc[:1], locks))
    with pytest.raises(EngineError, match="split locks"):
        paged_attention(*args, split=(slot0, ml, acc, locks[:1]))
