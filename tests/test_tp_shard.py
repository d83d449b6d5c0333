"""Tensor-parallel shard slicing (SPEC 4500-4522; engine/shard.py, engine/tp_plan.py), no peers needed.

The slices of every rank put back together give the full weight (column-parallel: per fused
part, row-parallel: along K); a shard's dense forward of the FFN and attention projections,
summed over ranks, is the full model's; shapes that do not split are refused with the reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from worker_orcd.engine.config import model_config
from worker_orcd.engine.shard import (
    check_block_split,
    column_shard,
    fused_parts,
    row_shard,
    ShardSink,
    shard_arena,
    shard_layout,
    staging_peak_bytes,
)
from worker_orcd.engine.tp_plan import TPSpec, check_shardable, shard_config
from worker_orcd.engine.weights import views, weight_layout
from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf import GGMLType, parse_file
from synthetic import synth as _synth

synth = _synth()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write_synthetic_model(tmp_path_factory.mktemp("tp") / "tiny-qwen2.gguf", "tiny-qwen2", "Q8_0")


def _full_arena(path: Path) -> tuple[object, object, torch.Tensor]:
    g = parse_file(path)
    cfg = model_config(g)
    lay = weight_layout(cfg, g, torch.float32)
    gen = torch.Generator().manual_seed(0)
    arena = torch.empty(lay.total_bytes, dtype=torch.uint8)
    for v in views(arena, lay).values():
        v.copy_(torch.randn(v.shape, generator=gen))
    return cfg, lay, arena


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_tp_column_and_row_slices_concatenate_back(degree: int) -> None:
    gen = torch.Generator().manual_seed(1)
    parts = (8, 4, 4)  # Q | K | V rows
    w = torch.randn(sum(parts), 6, generator=gen)
    shards = [column_shard(w, parts, r, degree) for r in range(degree)]
    assert all(s.shape == (sum(parts) // degree, 6) for s in shards)
    off = at = 0
    for n in parts:  # part i of the full weight is every rank's part i, in rank order
        step = n // degree
        assert torch.equal(torch.cat([s[at : at + step] for s in shards]), w[off : off + n])
        off, at = off + n, at + step
    wo = torch.randn(6, 8, generator=gen)
    assert torch.equal(torch.cat([row_shard(wo, r, degree) for r in range(degree)], dim=1), wo)


def test_tp_shard_arena_slots_are_the_full_weights_slices(tiny: Path) -> None:
    cfg, lay, arena = _full_arena(tiny)
    full = views(arena, lay)
    got = [views(*shard_arena(arena, lay, cfg, r, 2)) for r in range(2)]  # type: ignore[arg-type]
    for name, w in full.items():
        leaf = name.rsplit(".", 1)[-1]
        pieces = [g[name] for g in got]
        if leaf in ("wo", "w_down"):
            assert torch.equal(torch.cat(pieces, dim=1), w), name
        elif leaf in ("wqkv", "bqkv", "w_gate_up"):
            parts = fused_parts(cfg, name)  # type: ignore[arg-type]
            at = 0  # part i of a shard starts at the halves of the parts before it
            rebuilt = []
            for n in parts:
                rebuilt += [p[at : at + n // 2] for p in pieces]  # rank 0's half, then rank 1's
                at += n // 2
            assert torch.equal(torch.cat(rebuilt), w), name
        else:  # replicated: embeddings, output head, norms
            assert all(torch.equal(p, w) for p in pieces), name
    assert shard_layout(lay, cfg, 2).total_bytes < lay.total_bytes  # type: ignore[arg-type]


def test_tp_partial_products_sum_to_the_full_projection(tiny: Path) -> None:
    """Column-parallel gate/up then row-parallel down, summed over ranks (the all-reduce) = tp=1."""
    cfg, lay, arena = _full_arena(tiny)
    full = views(arena, lay)
    x = torch.randn(3, cfg.d_model, generator=torch.Generator().manual_seed(2))  # type: ignore[attr-defined]

    def mlp(w: dict[str, torch.Tensor]) -> torch.Tensor:
        gu = x @ w["0.w_gate_up"].T
        f = gu.shape[1] // 2
        return (torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]) @ w["0.w_down"].T

    def attn_out(w: dict[str, torch.Tensor], q_dim: int) -> torch.Tensor:
        return (x @ w["0.wqkv"].T)[:, :q_dim] @ w["0.wo"].T

    shards = [views(*shard_arena(arena, lay, cfg, r, 2)) for r in range(2)]  # type: ignore[arg-type]
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:  # fp32 sums in another order: rounding only
        return float((a - b).norm() / b.norm())

    assert rel(sum(mlp(s) for s in shards), mlp(full)) < 1e-6  # type: ignore[arg-type]
    q = cfg.q_dim  # type: ignore[attr-defined]
    assert rel(sum(attn_out(s, q // 2) for s in shards), attn_out(full, q)) < 1e-6  # type: ignore[arg-type]


def test_tp_shapes_that_do_not_split_are_refused(tiny: Path) -> None:
    cfg = model_config(parse_file(tiny))  # 4 heads, 2 KV heads, ffn 512
    assert shard_config(cfg, 2).n_kv_heads == 1 and shard_config(cfg, 2).ffn_dim == 256
    assert shard_config(cfg, 2).attn_scale == cfg.attn_scale
    with pytest.raises(ModelLoadError, match="num_kv_heads % 4 == 0"):
        check_shardable(cfg, 4)
    with pytest.raises(ModelLoadError, match="num_heads % 3 == 0"):
        check_shardable(dataclasses.replace(cfg, n_heads=4), 3)


def test_tp_quantized_blocks_split_only_on_block_boundaries() -> None:
    check_block_split(GGMLType.Q8_0, 896, 2)  # 448 = 14 blocks of 32
    check_block_split(GGMLType.Q4_K, 4096, 2)  # 2048 = 8 blocks of 256
    with pytest.raises(ModelLoadError, match="256-element block"):
        check_block_split(GGMLType.Q4_K, 4864, 2)  # Qwen2.5-0.5B's ffn: 2432 is not whole blocks
    with pytest.raises(ModelLoadError, match="32-element block"):
        check_block_split(GGMLType.Q8_0, 96, 2)


def test_tp_spec_validates_its_members() -> None:
    ok = dict(degree=2, rank=1, group_id="g", members=("a", "b"), master_host="127.0.0.1", master_port=1,
              secret=b"x" * 32)
    assert TPSpec(**ok).shard_id == "g-shard1of2"  # type: ignore[arg-type]
    assert "x" * 32 not in repr(TPSpec(**ok))  # type: ignore[arg-type]
    for bad, match in ((dict(rank=2), "rank"), (dict(members=("a",)), "member list"), (dict(secret=b"s"), "secret"),
                       (dict(degree=1, members=("a",), rank=0), "degree")):
        with pytest.raises(ValueError, match=match):
            TPSpec(**{**ok, **bad})  # type: ignore[arg-type]


# --- quantized residency: the GGUF blocks are split, then repacked ----------------------------


def _quantized_full(path: Path):  # noqa: ANN202
    from synthetic import cpu_arena

    _, cfg, lay, arena = cpu_arena(path, torch.float32)
    return cfg, lay, arena


def _bound_shard(cfg, lay, arena, rank: int, degree: int):  # noqa: ANN001, ANN202
    from worker_orcd.engine.weights import bind, make_planar

    sa, sl = shard_arena(arena, lay, cfg, rank, degree)
    make_planar(sa, sl)  # as the engine does: the shard's blocks are repacked, then sealed
    return sl, bind(sa, sl, shard_config(cfg, degree))


@pytest.mark.parametrize("wtype", ["Q8_0", "Q4_0", "Q5_1", "Q6_K"])
def test_tp_quantized_shards_dequantize_to_the_full_weights_slices(tmp_path: Path, wtype: str) -> None:
    """Every rank's QWeights, dequantized, are exactly the full matrices' slices (Megatron layout),
    planar types included; the shard arenas together hold the file's matrix bytes once."""
    from worker_orcd.engine.qweight import QWeight, WeightGroup
    from worker_orcd.engine.weights import bind, make_planar

    shape = "tiny-llama" if wtype != "Q6_K" else "mid-llama"  # Q6_K rows split along K need K/2 % 256 == 0
    path = synth.write_synthetic_model(tmp_path / "m.gguf", shape, wtype)
    cfg, lay, arena = _quantized_full(path)
    full_arena = arena.clone()
    make_planar(full_arena, lay)
    full = bind(full_arena, lay, cfg)
    import copy

    full_lay = copy.deepcopy(lay)
    full_lay.planar = False
    shards = [_bound_shard(cfg, full_lay, arena, r, 2) for r in range(2)]
    for i in range(cfg.n_layers):
        for attr, kind in (("wqkv", "column"), ("w_gate_up", "column"), ("wo", "row"), ("w_down", "row")):
            want = getattr(full.layers[i], attr).dequantize()
            pieces = [getattr(w.layers[i], attr) for _, w in shards]
            assert all(isinstance(p, (QWeight, WeightGroup)) for p in pieces), attr
            if kind == "row":
                assert torch.equal(torch.cat([p.dequantize() for p in pieces], dim=1), want), (i, attr)
            else:  # per fused part: rank 0's rows, then rank 1's
                parts = fused_parts(cfg, f"{i}.{attr}")
                got, at = [], 0
                for n in parts:
                    got += [p.dequantize()[at : at + n // 2] for p in pieces]
                    at += n // 2
                assert torch.equal(torch.cat(got), want), (i, attr)
        assert torch.equal(shards[0][1].layers[i].attn_norm, full.layers[i].attn_norm)
    for _, w in shards:  # replicated: the embedding (and output head) stay whole
        assert torch.equal(w.embed.dequantize(), full.embed.dequantize())
    split = sum(s.n_bytes for n, s in lay.slots.items() if n.startswith("blk.") and s.ggml_type is not None)
    assert sum(sum(s.n_bytes for n, s in sl.slots.items() if n.startswith("blk.") and s.ggml_type is not None)
               for sl, _ in shards) == split


def test_tp_quantized_row_split_inside_a_block_is_refused(tmp_path: Path) -> None:
    """tiny-llama's O has K = 256: Q4_K blocks of 256 cannot be halved; the load and the plan say why."""
    path = synth.write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", "Q4_K")
    cfg, lay, _ = _quantized_full(path)
    with pytest.raises(ModelLoadError, match="Q4_K matrix with K=256 cannot be split into 2 shards"):
        shard_layout(lay, cfg, 2)  # type: ignore[arg-type]
    from worker_orcd.engine.plan import plan_vram

    with pytest.raises(ModelLoadError, match="256-element block"):
        plan_vram(cfg, parse_file(path), torch.float16, None, 1 << 40, 0, 512, False, quantized=True, tp_degree=2)


def test_tp_quantized_forward_summed_over_ranks_equals_tp1(tmp_path: Path) -> None:
    """Two ranks' quantized shards run the real TPModel forward in lockstep (the all-reduce is a sum
    across two threads): the logits equal the tp=1 quantized model's within fp32 rounding."""
    import threading

    from worker_orcd.engine.model import Model
    from worker_orcd.engine.paged_kv import PagedKVCache
    from worker_orcd.engine.runner import ModelRunner
    from worker_orcd.engine.tensor_parallel import TPModel
    from worker_orcd.engine.weights import bind, make_planar

    path = synth.write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", "Q8_0")
    cfg, lay, arena = _quantized_full(path)
    shards = [_bound_shard(cfg, lay, arena, r, 2) for r in range(2)]
    make_planar(arena, lay)
    cpu = torch.device("cpu")
    one = ModelRunner(Model(cfg, bind(arena, lay, cfg)), PagedKVCache.allocate(cfg, 64, torch.float32, cpu), cpu, 64, 1)

    barrier = threading.Barrier(2)
    box: list[torch.Tensor | None] = [None, None]

    class Pair:  # the collective only: both threads' partial sums, added in rank order
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
            box[self.rank] = x.clone()
            barrier.wait()
            total = box[0] + box[1]  # type: ignore[operator]
            barrier.wait()
            x.copy_(total)
            return x

    scfg = shard_config(cfg, 2)
    runners = [ModelRunner(TPModel(scfg, w, Pair(r)), PagedKVCache.allocate(scfg, 64, torch.float32, cpu), cpu, 64, 1)
               for r, (_, w) in enumerate(shards)]
    tokens = [1, 5, 9, 200, 3, 77]
    out: list[torch.Tensor | None] = [None, None]

    def run(r: int) -> None:
        with torch.no_grad():
            out[r] = runners[r].prefill_logits(tokens)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    with torch.no_grad():
        want = one.prefill_logits(tokens)
    assert out[0] is not None and torch.equal(out[0], out[1])  # every rank computes the same logits
    assert float((out[0] - want).norm() / want.norm()) < 1e-5


def test_tp_quantized_plan_is_the_shard_layout(tmp_path: Path) -> None:
    """/worker/plan's per-rank weights for the quantized residency are the engine's shard arena; the
    load peak holds the split slots staged in file order, not the whole block arena."""
    from worker_orcd.engine.plan import plan_vram

    path = synth.write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", "Q8_0")
    g = parse_file(path)
    cfg = model_config(g)
    full = weight_layout(cfg, g, torch.float16, quantized=True)
    one = plan_vram(cfg, g, torch.float16, 64, 1 << 40, 0, 512, False, quantized=True)
    two = plan_vram(cfg, g, torch.float16, 64, 1 << 40, 0, 512, False, quantized=True, tp_degree=2)
    assert one.weights_bytes == full.total_bytes
    assert two.weights_bytes == shard_layout(full, cfg, 2).total_bytes < one.weights_bytes
    assert two.weights_sharded_bytes + two.weights_replicated_bytes <= two.weights_bytes
    assert two.weights_replicated_bytes > 0 and two.weights_sharded_bytes > 0
    assert two.load_peak_bytes == two.resident_bytes - two.kv_cache_bytes + staging_peak_bytes(full, g)


# --- slicing while streaming: ShardSink ------------------------------------------------------


def _streamed_shard(path: Path, quantized: bool, rank: int, degree: int, chunk: int = 1 << 14):  # noqa: ANN202
    """A rank's shard as the engine loads it: upload through ShardSink (never the full arena)."""
    from worker_orcd.engine.device import DeviceContext
    from worker_orcd.engine.upload import upload
    from worker_orcd.integrity import sha256_path

    g = parse_file(path)
    cfg = model_config(g)
    full = weight_layout(cfg, g, torch.float32, quantized=quantized)
    out = torch.full((shard_layout(full, cfg, degree).total_bytes,), 0xAB, dtype=torch.uint8)  # poisoned
    sink = ShardSink(out, full, cfg, rank, degree)
    with open(path, "rb") as fh:
        stats = upload(fh, g, full, out, sha256_path(path), DeviceContext("cpu", 0, "cpu", 0), chunk_bytes=chunk, sink=sink)
    return g, cfg, full, out, sink, stats


@pytest.mark.parametrize(("shape", "wtype", "quantized"), [
    ("tiny-qwen2", "Q8_0", False),  # dense: dequantized chunk by chunk into the staged slot
    ("tiny-qwen2", "Q4_K_M", False),
    ("tiny-llama", "Q8_0", True),  # GGUF blocks: column rows / row-parallel block runs
    ("mid-llama", "Q6_K", True),
    ("tiny-llama", "Q3_K_M", True),  # Q3_K matrices dequantized at load: dense slots inside a quantized layout
])
@pytest.mark.parametrize("rank", [0, 1])
def test_tp_streamed_shard_equals_the_full_arenas_slice(
    tmp_path_factory: pytest.TempPathFactory, shape: str, wtype: str, quantized: bool, rank: int
) -> None:
    """Slicing while streaming gives, byte for byte, what uploading everything and slicing after gives;
    every byte of the shard arena is written (it started poisoned) and the staging held at most
    what the plan says, far below the full arena."""
    from worker_orcd.engine.device import DeviceContext
    from worker_orcd.engine.upload import upload
    from worker_orcd.integrity import sha256_path

    path = tmp_path_factory.mktemp("stream") / f"{shape}-{wtype}.gguf"
    if not path.exists():
        synth.write_synthetic_model(path, shape, wtype)
    g, cfg, full, out, sink, stats = _streamed_shard(path, quantized, rank, 2)
    lay = sink.finish()
    arena = torch.empty(full.total_bytes, dtype=torch.uint8)
    with open(path, "rb") as fh:
        upload(fh, g, full, arena, sha256_path(path), DeviceContext("cpu", 0, "cpu", 0), chunk_bytes=1 << 16)
    want, want_lay = shard_arena(arena, full, cfg, rank, 2)
    assert lay.slots == want_lay.slots
    got_v, want_v = views(out, lay), views(want, want_lay)
    for name in lay.slots:
        assert torch.equal(got_v[name].view(torch.uint8), want_v[name].view(torch.uint8)), name
    assert stats.resident_bytes == out.numel() < full.total_bytes
    assert stats.digest == sha256_path(path)
    assert 0 < sink.peak_staged_bytes <= staging_peak_bytes(full, g)
    assert sink.staged_bytes == 0


def test_tp_shard_sink_refuses_an_incomplete_or_overfull_stream(tiny: Path) -> None:
    """A slot left short (a stream that stopped early) or written past its size is a load error."""
    g = parse_file(tiny)
    cfg = model_config(g)
    full = weight_layout(cfg, g, torch.float32)
    out = torch.empty(shard_layout(full, cfg, 2).total_bytes, dtype=torch.uint8)
    sink = ShardSink(out, full, cfg, 0, 2)
    sink.target("0.w_down")
    sink.written("0.w_down", 5)
    with pytest.raises(ModelLoadError, match="not fully streamed"):
        sink.finish()
    with pytest.raises(ModelLoadError, match="more values written"):
        sink.written("0.w_down", full.slots["0.w_down"].n_bytes)
    with pytest.raises(ValueError, match="shard arena is"):
        ShardSink(torch.empty(3, dtype=torch.uint8), full, cfg, 0, 2)


def test_tp_staging_peak_is_one_open_slot_set_not_the_model(tiny: Path) -> None:
    """The staging peak follows file order: a slot opens at its first tensor and closes after its last,
    so interleaving two split slots' tensors holds both at once."""
    g = parse_file(tiny)
    cfg = model_config(g)
    full = weight_layout(cfg, g, torch.float32)
    peak = staging_peak_bytes(full, g)
    split = [s for n, s in full.slots.items() if not n.endswith(("norm", "embed", "lm_head"))]
    biggest = max(-(-s.n_bytes // (2 << 20)) * (2 << 20) for s in split)
    assert biggest <= peak < sum(-(-s.n_bytes // (2 << 20)) * (2 << 20) for s in split)
