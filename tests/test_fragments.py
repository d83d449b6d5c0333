"""Q4_K weights in the tensor core's fragment order (``qlayout.to_fragments``, ``kernels/fragments.py``):
the repacking is a byte permutation with an exact inverse, the values are ``q4k_half2_weight``'s, and every
row equals the dense chains over the same K segments, at every M and in both forms (so the blocks' half2
kernel's rows: the GPU test compares them directly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_qmatmul import make, rowwise_dot  # noqa: F401  (rowwise_dot: a fixture)
from worker_orcd.engine.errors import KernelDimensionError
from worker_orcd.engine.kernels import fragments as F
from worker_orcd.engine.kernels import qmatmul_tiled as tiled
from worker_orcd.engine.kernels.qmatmul import qlinear, qmatmul
from worker_orcd.engine.qlayout import (fragment_rows, fragments_fit, from_fragments, q6k_from_fragments, q6k_to_fragments,
                                        q8_from_fragments, q8_to_fragments, to_fragments, to_planes)
from worker_orcd.engine.qweight import QWeight, WeightGroup
from worker_orcd.gguf.constants import GGMLType

Q4K, Q6K, Q80 = GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0
TYPES = [Q4K, Q6K, Q80]


def _pair(n: int, k: int, gen: torch.Generator, device: str, t: GGMLType = Q4K) -> tuple[QWeight, QWeight]:
    """(the half2 weight as the blocks' kernels read it -- Q4_K blocks, Q6_K planes --, the same in fragment order)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    w, _ = make(t, n, k, rng, device)
    if t == Q6K:
        old = QWeight(to_planes(w.raw, t, n, k), t, n, k, planar=True, half2=True)
        return old, QWeight(q6k_to_fragments(w.raw, n, k), t, n, k, half2=True, fragments=True)
    if t == Q80:  # ggml's values, as the planes' kernel
        return (QWeight(to_planes(w.raw, t, n, k), t, n, k, planar=True),
                QWeight(q8_to_fragments(w.raw, n, k), t, n, k, fragments=True))
    return QWeight(w.raw, t, n, k, half2=True), QWeight(to_fragments(w.raw, n, k), t, n, k, half2=True, fragments=True)


def _values(w: QWeight) -> torch.Tensor:
    """The fp16 values the fused kernels multiply by: half2's for Q4_K/Q6_K, ggml's rounded once for Q8_0."""
    return tiled.half2_weight(w) if w.half2 else w.dequantize(torch.float32).to(w.device).half()


@pytest.mark.parametrize("t", [Q6K, Q80], ids=lambda t: t.name)
def test_worker_4701_q6k_q8_fragment_order_has_its_inverse(t: GGMLType, gen: torch.Generator) -> None:
    planes, frag = _pair(128, 512, gen, "cpu", t)
    blocks = planes.gguf_bytes()
    assert frag.raw.numel() == blocks.numel()  # resident bytes = file bytes
    assert torch.equal((q6k_from_fragments if t == Q6K else q8_from_fragments)(frag.raw, 128, 512), blocks)
    assert torch.equal(frag.gguf_bytes(), blocks)
    idx = torch.tensor([0, 127, 9, 64])
    assert torch.equal(frag.rows(idx), planes.rows(idx))
    assert torch.equal(frag.dequantize(), planes.dequantize())
    with pytest.raises(ValueError, match="N % 64"):
        q6k_to_fragments(torch.zeros(96 * 2 * 210, dtype=torch.uint8), 96, 512)
    with pytest.raises(ValueError, match="N % 64"):
        q8_to_fragments(torch.zeros(96 * 16 * 34, dtype=torch.uint8), 96, 512)


def test_worker_4701_fragment_order_is_a_permutation_with_its_inverse(gen: torch.Generator) -> None:
    blocks, frag = _pair(128, 512, gen, "cpu")
    assert frag.raw.numel() == blocks.raw.numel()  # resident bytes = file bytes
    assert not torch.equal(frag.raw, blocks.raw)
    assert torch.equal(torch.sort(frag.raw).values, torch.sort(blocks.raw).values)  # the same bytes, moved
    assert torch.equal(from_fragments(frag.raw, 128, 512), blocks.raw)
    assert torch.equal(frag.gguf_bytes(), blocks.raw)
    idx = torch.tensor([0, 127, 8, 9, 64, 71, 17, 3])
    assert torch.equal(frag.rows(idx), blocks.rows(idx))
    assert torch.equal(fragment_rows(frag.raw, 128, 512, idx[:1]), blocks.raw.view(128, -1)[0])
    assert torch.equal(frag.dequantize(), blocks.dequantize())


def test_worker_4701_fragment_order_refuses_what_does_not_fit() -> None:
    assert fragments_fit(4608, 3584) and fragments_fit(64, 256)
    assert not fragments_fit(96, 512) and not fragments_fit(128, 896) and not fragments_fit(0, 256)
    raw = torch.zeros(96 * 2 * 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="N % 64"):
        to_fragments(raw, 96, 512)
    with pytest.raises(ValueError, match="block bytes"):
        to_fragments(torch.zeros(10, dtype=torch.uint8), 64, 256)
    ok = torch.zeros(64 * 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="fragment order"):
        QWeight(ok, Q4K, 64, 256, fragments=True)  # fragments hold half2 values only
    with pytest.raises(ValueError, match="fragment order"):
        QWeight(torch.zeros(96 * 144, dtype=torch.uint8), Q4K, 96, 256, half2=True, fragments=True)
    with pytest.raises(ValueError, match="fragment order"):
        QWeight(torch.zeros(64 * 22 * 8, dtype=torch.uint8), GGMLType.Q5_0, 64, 256, fragments=True)
    with pytest.raises(ValueError, match="fragment order"):
        QWeight(torch.zeros(96 * 34 * 8, dtype=torch.uint8), GGMLType.Q8_0, 96, 256, fragments=True)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_worker_4701_fragments_dequantize_to_the_half2_values(t: GGMLType, gen: torch.Generator, device: str) -> None:
    """The kernel's own dequantization (the prefill scratch; on the GPU the PTX) gives the blocks' kernels'
    values bit for bit (``half2_weight``'s; Q8_0: ggml's rounded once)."""
    blocks, frag = _pair(128, 768, gen, device, t)
    ref = _values(blocks)
    assert torch.equal(F.fragments_dequant(frag), ref)
    assert torch.equal(tiled.half2_dequant(frag), ref)  # the prefill path's entry
    if t != Q80:
        assert torch.equal(tiled.half2_dequant(blocks), ref)
        assert torch.equal(tiled.half2_weight(frag), ref)


@pytest.mark.parametrize("dot_k,min_br", [(32, 16), (64, 8)], ids=["default", "dot64-br8"])
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n,k", [(128, 512), (192, 768)])
def test_worker_4711_fragment_rows_are_the_dense_chains_at_every_m(
    rowwise_dot: None, t: GGMLType, n: int, k: int, dot_k: int, min_br: int, gen: torch.Generator,  # noqa: F811
    device: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each row equals the dense chains over ``k_segments`` on the half2 values (bias after them),
    whatever M, the form (swapped or not), the row's place in the batch, the inputs per dot
    (``DOT_K``: Q4_K's two 32-input dots per chunk or one of 64) and the tokens per decode program
    (``MIN_BR``: 8 or 16 up to 8 rows)."""
    monkeypatch.setattr(F, "DOT_K", dot_k)
    monkeypatch.setattr(F, "MIN_BR", min_br)
    launches: list[dict] = []  # the switches must reach the launches (the rows alone cannot tell: they are equal)
    real = F.fragments_kernel

    class Spy:
        def __getitem__(self, grid):  # noqa: ANN001, ANN204
            def launch(*args, **kw):  # noqa: ANN002, ANN003, ANN202
                launches.append(kw)
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(F, "fragments_kernel", Spy())
    blocks, frag = _pair(n, k, gen, device, t)
    wh = _values(blocks)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=torch.float16)
    pool = torch.randn(70, k, generator=gen).to(device=device, dtype=torch.float16)
    out = torch.empty(70, n, dtype=torch.float16, device=device)
    full = F.fragments_matmul(pool, frag, bias, out.clone(), swap=False)
    assert torch.equal(full, tiled.segments_reference(pool, wh, bias))
    for m in (1, 5, 16, 33, 64):
        idx = torch.randperm(70, generator=gen)[:m].to(device)
        got = F.fragments_matmul(pool[idx], frag, bias, out[:m].clone(), swap=True)
        assert torch.equal(got, full[idx]), f"M={m}"
        assert torch.equal(qmatmul(pool[idx], frag, bias), full[idx]), f"qmatmul M={m}"  # the dispatch
    swapped = [kw for kw in launches if kw["SWAP"]]
    assert swapped and all(kw["K64"] == (dot_k == 64) for kw in swapped)
    assert {kw["BR"] for kw in swapped} == ({min_br, 16, 64} if min_br < 16 else {16, 64})  # M = 1/5, 16, 33/64


def test_worker_4701_fragments_in_a_mixed_group(rowwise_dot: None, gen: torch.Generator, device: str) -> None:  # noqa: F811
    """A Q4_K_M QKV group: a fragment-order Q4_K part beside a Q6_K one writes its own columns."""
    _, frag = _pair(64, 512, gen, device)
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    other, _ = make(GGMLType.Q8_0, 32, 512, rng, device)
    x = torch.randn(3, 512, generator=gen).to(device=device, dtype=torch.float16)
    y = qlinear(x, WeightGroup((frag, other)))
    assert torch.equal(y[:, :64], qmatmul(x, frag))
    assert torch.equal(y[:, 64:], qmatmul(x, other))


def test_worker_4701_fragments_refuse_other_activations(gen: torch.Generator, device: str) -> None:
    _, frag = _pair(64, 256, gen, device)
    x = torch.randn(2, 256, generator=gen).to(device)
    with pytest.raises(KernelDimensionError, match="fragment order"):
        tiled.qmatmul_tiled(x, frag, None, torch.empty(2, 64, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_worker_4711_gpu_fragment_rows_equal_the_blocks_kernel(t: GGMLType, gen: torch.Generator, device: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled (the PTX, the 16-byte loads, Triton's layouts): at M = 1..300, through every path
    (swapped, unswapped, the prefill scratch), a row's bits are the blocks' half2 kernel's and the
    dense chains' on the half2 values -- the repacking changes where bytes are, not one result."""
    blocks, frag = _pair(1024, 3584, gen, device, t)
    wh = _values(blocks)
    bias = torch.randn(1024, generator=gen).to(device=device, dtype=torch.float16)
    pool = torch.randn(300, 3584, generator=gen).to(device=device, dtype=torch.float16)
    full = qmatmul(pool, blocks, bias)
    assert torch.equal(full, tiled.segments_reference(pool, wh, bias))
    assert torch.equal(qmatmul(pool, frag, bias), full)
    for m in (1, 2, 16, 17, 33, 64, 65, 128, 255, 256, 299):
        idx = torch.randperm(300, generator=gen)[:m].to(device)
        assert torch.equal(qmatmul(pool[idx], frag, bias), full[idx]), f"M={m}"
        out = torch.empty(m, 1024, dtype=torch.float16, device=device)
        assert torch.equal(F.fragments_matmul(pool[idx], frag, bias, out, swap=m <= 64), full[idx]), f"fused M={m}"
        if m <= 16:  # the pipeline depth (fragments.swap_stages picks it per type and segment) changes no bit
            for st in (2, 3, 4):
                y = F.fragments_matmul(pool[idx], frag, bias, out.clone(), stages=st)
                assert torch.equal(y, full[idx]), f"M={m} stages={st}"
            for dot_k, min_br in ((64, 16), (32, 8), (64, 8), (32, 16)):  # nor Q4_K's inputs per dot, nor the tensor
                monkeypatch.setattr(F, "DOT_K", dot_k)  # core's N (tokens per program) up to 8 rows
                monkeypatch.setattr(F, "MIN_BR", min_br)
                y = F.fragments_matmul(pool[idx], frag, bias, out.clone())
                assert torch.equal(y, full[idx]), f"M={m} dot_k={dot_k} min_br={min_br}"


@pytest.mark.parametrize("wtype,half2,types", [("Q4_K_M", True, {Q4K, Q6K}), ("Q4_K_M", False, set()), ("Q8_0", False, {Q80}),
                                               ("Q8_0", True, {Q80})])
def test_worker_4100_residency_binds_matrices_in_fragment_order(
    tmp_path, wtype: str, half2: bool, types: set[GGMLType]  # noqa: ANN001
) -> None:
    """``make_planar`` (the engine, fp16) repacks every Q8_0 matrix that fits and, under ``quantized-half2``,
    every Q4_K/Q6_K one, not the embedding; ``bind`` marks them; each is the file's blocks when read back."""
    from synthetic import cpu_arena, synth
    from worker_orcd.engine.weights import bind, make_planar

    path = synth().write_synthetic_model(tmp_path / "tiny.gguf", "tiny-llama", wtype)
    g, cfg, lay, arena = cpu_arena(path, torch.float16)
    before = arena.clone()
    make_planar(arena, lay, half2=half2)
    w = bind(arena, lay, cfg, half2=half2)
    parts = [p for lw in w.layers for m in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)
             for p in (m.parts if isinstance(m, WeightGroup) else (m,))]
    frag = [p for p in parts if p.fragments]
    assert all(not p.planar and p.half2 == (p.ggml_type != Q80) for p in frag)
    assert all(p.fragments == (p.ggml_type in types) for p in parts)  # every matrix of this shape fits
    assert {p.ggml_type for p in frag} == types
    assert isinstance(w.embed, QWeight) and not w.embed.fragments  # untied: a lookup table only
    data = path.read_bytes()
    for p in frag:
        name = next(n for n, s in lay.slots.items() if s.byte_offset == p.raw.data_ptr() - arena.data_ptr())
        info = g.tensor(name)
        s = lay.slots[name]
        assert not torch.equal(arena[s.byte_offset : s.byte_offset + s.n_bytes], before[s.byte_offset : s.byte_offset + s.n_bytes])
        assert p.gguf_bytes().numpy().tobytes() == data[info.data_offset : info.data_offset + info.n_bytes]


def test_worker_4711_q8_fragments_with_a_ragged_k(rowwise_dot: None, gen: torch.Generator, device: str) -> None:  # noqa: F811
    """Q8_0 rows need K % 32 only (a 0.5B's 896, a 72B's FFN down 29,568): the last segment's blocks past a
    multiple of 128 run the tail loop, and the rows are still the dense chains."""
    blocks, frag = _pair(64, 352, gen, device, Q80)
    assert tiled.k_segments(64, 352) == (256, 2)
    wh = _values(blocks)
    pool = torch.randn(40, 352, generator=gen).to(device=device, dtype=torch.float16)
    full = F.fragments_matmul(pool, frag, None, torch.empty(40, 64, dtype=torch.float16, device=device), swap=False)
    assert torch.equal(full, tiled.segments_reference(pool, wh))
    for m in (1, 7, 40):
        got = F.fragments_matmul(pool[:m], frag, None, torch.empty(m, 64, dtype=torch.float16, device=device), swap=True)
        assert torch.equal(got, full[:m]), f"M={m}"
    assert torch.equal(F.fragments_dequant(frag), wh)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_worker_4711_fused_segment_sum_is_the_second_launch_bit_for_bit(
    rowwise_dot: None, t: GGMLType, gen: torch.Generator, device: str  # noqa: F811
) -> None:
    """With the weight's counters the last K segment of a tile adds the segments' partials in order inside the
    launch: the same rows as the separate sum kernel, bias included, and the counters are zero again after."""
    import dataclasses

    _, frag = _pair(128, 768, gen, device, t)
    assert tiled.k_segments(128, 768)[1] > 1
    fused = dataclasses.replace(frag, locks=torch.zeros(8, dtype=torch.int32, device=device))
    bias = torch.randn(128, generator=gen).to(device=device, dtype=torch.float16)
    for m in (1, 16, 33, 64):
        x = torch.randn(m, 768, generator=gen).to(device=device, dtype=torch.float16)
        a = F.fragments_matmul(x, frag, bias, torch.empty(m, 128, dtype=torch.float16, device=device))
        b = F.fragments_matmul(x, fused, bias, torch.empty(m, 128, dtype=torch.float16, device=device))
        assert torch.equal(a, b), f"M={m}"
        assert int(fused.locks.abs().sum()) == 0


@pytest.mark.parametrize("wtype", ["Q4_K_M", "Q8_0"])
def test_worker_4100_a_tied_embedding_is_in_fragment_order_and_looks_up_its_rows(tmp_path, wtype: str) -> None:  # noqa: ANN001
    """A tied embedding is also the output head: it is repacked like the other matrices, and the embedding
    lookup gathers each token's row back as the file's blocks."""
    from synthetic import cpu_arena, synth
    from worker_orcd.engine.weights import bind, make_planar

    path = synth().write_synthetic_model(tmp_path / "tied.gguf", "tiny-qwen2", wtype)
    g, cfg, lay, arena = cpu_arena(path, torch.float16)
    assert cfg.tied_embeddings
    make_planar(arena, lay, half2=True)
    w = bind(arena, lay, cfg, half2=True)
    assert w.lm_head is w.embed and isinstance(w.embed, QWeight) and w.embed.fragments
    info = g.tensor("token_embd.weight")
    data = np.frombuffer(path.read_bytes()[info.data_offset : info.data_offset + info.n_bytes], dtype=np.uint8)
    blocks = torch.from_numpy(data.copy()).view(w.embed.n, -1)
    idx = torch.tensor([5, 0, w.embed.n - 1, 64, 5], dtype=torch.int32)
    assert torch.equal(w.embed.rows(idx), blocks.index_select(0, idx).reshape(-1))



@pytest.mark.parametrize("types", [(t, t, t) for t in TYPES] + [(Q4K, Q4K, Q6K), (Q6K, Q6K, Q4K), (Q4K, Q4K, Q80),
                                                                  (Q80, Q80, Q6K)], ids=lambda ts: "-".join(t.name for t in ts))
def test_worker_4711_stacked_parts_in_one_launch_are_each_parts_rows(types: tuple[GGMLType, ...], gen: torch.Generator,
                                                                     device: str) -> None:
    """q/k/v in one launch (``fragments_matmul_parts``), of one type or with a third of another (Q4_K_M's v): each
    part's columns bit for bit its own launch's, with and without the in-launch segment sum, bias included; at
    M = 1 and 16."""
    parts = tuple(_pair(n, 512, gen, device, t)[1] for n, t in zip((128, 64, 64), types, strict=True))
    assert F.parts_fit(parts, 1) and tiled.k_segments(128, 512)[1] > 1  # segmented: the sum path runs
    bias = (torch.randn(256, generator=gen) * 0.1).to(device=device, dtype=torch.float16)
    for m in (1, 16):
        x = (torch.randn(m, 512, generator=gen) * 0.5).to(device=device, dtype=torch.float16)
        want = torch.cat([F.fragments_matmul(x, p, bias[o : o + p.n], torch.empty(m, p.n, dtype=torch.float16, device=device))
                          for p, o in zip(parts, (0, 128, 192), strict=True)], dim=1)
        for locks in (None, torch.zeros(4 * 4, dtype=torch.int32, device=device)):
            got = F.fragments_matmul_parts(x, parts, bias, torch.empty(m, 256, dtype=torch.float16, device=device), locks)
            assert torch.equal(got, want)
            assert locks is None or not locks.any()  # the counters are left zeroed
        if types[1] == types[2]:
            two = F.fragments_matmul_parts(x, parts[1:], bias[128:], torch.empty(m, 128, dtype=torch.float16, device=device))
            assert torch.equal(two, want[:, 128:])


def test_worker_4400_stacked_parts_refuse_what_does_not_fit(gen: torch.Generator, device: str) -> None:
    q4 = _pair(64, 512, gen, device, Q4K)[1]
    q6 = _pair(64, 512, gen, device, Q6K)[1]
    x = torch.zeros(1, 512, dtype=torch.float16, device=device)
    assert not F.parts_fit((q4, q6), 1) and not F.parts_fit((q4,), 1) and not F.parts_fit((q4, q4), 65)
    assert not F.parts_fit((q4, q6, q4), 1) and F.parts_fit((q4, q4, q6), 1)  # only a third part may differ
    with pytest.raises(KernelDimensionError, match="same-type"):
        F.fragments_matmul_parts(x, (q4, q6), None, torch.empty(1, 128, dtype=torch.float16, device=device))
    with pytest.raises(KernelDimensionError, match="same-type"):
        F.fragments_matmul_parts(x, (q4, q6, q4), None, torch.empty(1, 192, dtype=torch.float16, device=device))


@pytest.mark.parametrize("mixed", [True, False])
def test_worker_4711_qlinear_runs_same_type_parts_in_one_launch(mixed: bool, gen: torch.Generator, device: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A Q4_K_M-like q/k/v group (Q4_K, Q4_K, Q6_K) with the group's counters: q, k and v in one launch (q and k,
    then v alone, with MIXED_PARTS off); every column bit for bit the per-part matmul's, at small decode sizes and
    above PARTS_MAX_M (per part there)."""
    monkeypatch.setattr(F, "MIXED_PARTS", mixed)
    parts = (_pair(128, 512, gen, device, Q4K)[1], _pair(64, 512, gen, device, Q4K)[1], _pair(64, 512, gen, device, Q6K)[1])
    all_locks = torch.zeros(sum(p.n // 64 * 4 for p in parts), dtype=torch.int32, device=device)
    at = 0
    for p in parts:
        object.__setattr__(p, "locks", all_locks[at : at + p.n // 64 * 4])  # as weights.bind slices them
        at += p.n // 64 * 4
    group = WeightGroup(parts, locks=all_locks)
    bias = (torch.randn(256, generator=gen) * 0.1).to(device=device, dtype=torch.float16)
    assert F.parts_fit(parts[:2], 1) and F.parts_fit(parts, 1) == mixed
    runs: list[int] = []
    real = F.fragments_matmul_parts
    monkeypatch.setattr(F, "fragments_matmul_parts", lambda x, run, *a: runs.append(len(run)) or real(x, run, *a))
    for m in (1, 7, F.PARTS_MAX_M + 1, 80):
        x = (torch.randn(m, 512, generator=gen) * 0.5).to(device=device, dtype=torch.float16)
        want = torch.cat([qmatmul(x, p, bias[o : o + p.n]) for p, o in zip(parts, (0, 128, 192), strict=True)], dim=1)
        assert torch.equal(qlinear(x, group, bias), want)
        assert not all_locks.any()
    assert runs == ([3, 3] if mixed else [2, 2])  # at M = 1 and 7; per part above PARTS_MAX_M (where stacking lost)


@pytest.mark.gpu
def test_worker_4711_gpu_mixed_parts_are_each_parts_rows(gen: torch.Generator) -> None:
    """On the GPU (compiled): a launch whose programs take the Q4_K or the Q6_K path by row group gives each part's
    own launch's columns, bit for bit."""
    for types in ((Q4K, Q4K, Q6K), (Q6K, Q6K, Q4K), (Q4K, Q4K, Q80)):
        test_worker_4711_stacked_parts_in_one_launch_are_each_parts_rows(types, gen, "cuda")
