"""Quantized residency (issue 13): matrices stay GGUF blocks in the arena, byte for byte as verified,
bound as QWeight / mixed-type WeightGroup, and the forward pass over them equals the dense one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from synthetic import synth as _synth
from worker_orcd.engine import ops
from worker_orcd.engine.config import model_config
from worker_orcd.engine.device import DeviceContext
from worker_orcd.engine.paged_kv import PagedKVCache
from worker_orcd.engine.runner import ModelRunner
from worker_orcd.engine.model import Model
from worker_orcd.engine.qweight import QWeight, WeightGroup
from worker_orcd.engine.upload import upload
from worker_orcd.engine.qlayout import PLANAR_TYPES, to_planes
from worker_orcd.engine.weights import bind, make_planar, weight_layout
from worker_orcd.gguf.constants import GGMLType
from worker_orcd.gguf.reader import parse_file
from worker_orcd.integrity import sha256_path

synth = _synth()


def _resident(path: Path, quantized: bool):  # noqa: ANN202
    g = parse_file(path)
    cfg = model_config(g)
    ctx = DeviceContext("cpu", 0, "cpu", 0)
    lay = weight_layout(cfg, g, torch.float32, quantized=quantized)
    arena = torch.empty(lay.total_bytes, dtype=torch.uint8)
    with open(path, "rb") as fh:
        upload(fh, g, lay, arena, sha256_path(path), ctx, chunk_bytes=1 << 16)
    if quantized:
        make_planar(arena, lay)  # as the engine does after the hashed upload
    w = bind(arena, lay, cfg)
    kv = PagedKVCache.allocate(cfg, 64, torch.float32, torch.device("cpu"))
    return g, cfg, lay, w, ModelRunner(Model(cfg, w), kv, torch.device("cpu"), 64, 1)


@pytest.fixture(scope="module")
def q4km(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write_synthetic_model(tmp_path_factory.mktemp("qres") / "tiny.gguf", "tiny-llama", "Q4_K_M")


def test_worker_4100_matrices_resident_as_file_bytes(q4km: Path) -> None:
    g, cfg, lay, w, _ = _resident(q4km, quantized=True)
    assert isinstance(w.layers[0].wqkv, WeightGroup) and isinstance(w.layers[0].w_gate_up, WeightGroup)
    types = {p.ggml_type for lw in w.layers for p in lw.wqkv.parts}
    assert GGMLType.Q6_K in types and GGMLType.Q4_K in types, types  # Q4_K_M mixes them inside QKV
    assert isinstance(w.lm_head, QWeight) and isinstance(w.embed, QWeight)
    data = q4km.read_bytes()
    for name in ("blk.1.attn_v.weight", "blk.0.ffn_down.weight", "token_embd.weight", "output.weight"):
        info = g.tensor(name)
        s = lay.slots[name]
        resident = w.arena[s.byte_offset : s.byte_offset + s.n_bytes]
        file_bytes = data[info.data_offset : info.data_offset + info.n_bytes]
        if s.ggml_type in PLANAR_TYPES:  # Q6_K: the fixed plane permutation of the verified bytes
            want = to_planes(torch.frombuffer(bytearray(file_bytes), dtype=torch.uint8), s.ggml_type, *s.shape)
            assert torch.equal(resident, want), name
        else:
            assert resident.numpy().tobytes() == file_bytes, name
    assert any(s.ggml_type in PLANAR_TYPES for s in lay.slots.values()) and lay.planar
    matrices = sum(t.n_bytes for t in g.tensors if len(t.shape) == 2)
    assert lay.total_bytes < 1.05 * g.tensor_bytes + 256 * len(lay.slots)
    assert lay.total_bytes >= matrices


def test_worker_4100_quantized_forward_equals_dense(q4km: Path) -> None:
    """Same weights, same math: the quantized-resident model's logits equal the dense model's bit for bit
    on the CPU path, and the interpreted fused kernel's within fp32 rounding."""
    *_, dense = _resident(q4km, quantized=False)
    *_, quant = _resident(q4km, quantized=True)
    tokens = torch.tensor([1, 5, 9, 200, 3])
    with torch.no_grad():
        want = dense.prefill_logits(tokens.tolist())
        assert torch.equal(quant.prefill_logits(tokens.tolist()), want)
        ops.use_kernels_on_cpu(True)
        try:
            x = quant.model.embed(tokens)
            assert torch.equal(x, dense.model.embed(tokens))
            h = torch.randn(3, x.shape[1])
            lw = quant.model.w.layers[0]
            got = ops.linear(h, lw.wqkv, lw.bqkv)
            ref = h.double() @ dense.model.w.layers[0].wqkv.double().t()
            assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-6
            logits = ops.logits_fp32(h[:1], quant.model.w.lm_head)
            assert logits.dtype == torch.float32
            ref = h[:1].double() @ dense.model.w.lm_head.double().t()
            assert ((logits.double() - ref).norm() / ref.norm()).item() < 1e-6
        finally:
            ops.use_kernels_on_cpu(False)


@pytest.mark.parametrize(
    ("shape", "wtype"),
    [
        ("tiny-qwen2", "Q4_K_M"),
        ("tiny-llama", "Q8_0"),
        ("tiny-gemma3", "F16"),
        ("tiny-llama", "Q3_K_M"),  # Q3_K (dequantized at load) beside fused K-quants
        ("tiny-qwen2", "Q2_K"),  # every matrix dequantized at load
    ],
)
@pytest.mark.parametrize("kv_mb", [None, 1])
def test_worker_4103_vram_budget_equals_cuda_plan(
    shape: str, wtype: str, kv_mb: int | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """inspect's torch-free vram_plan == the CUDA engine's plan (INSUFFICIENT_VRAM's numbers) == the layout."""
    from worker_orcd.engine.plan import plan_vram
    from worker_orcd.engine.vram_budget import vram_plan_summary

    path = synth.write_synthetic_model(tmp_path_factory.mktemp("vb") / f"{shape}.gguf", shape, wtype)
    g = parse_file(path)
    cfg = model_config(g)
    dtype = torch.bfloat16 if cfg.arch == "gemma3" else torch.float16
    summary = vram_plan_summary(cfg, g, kv_mb, "quantized")
    plan = plan_vram(cfg, g, dtype, kv_mb, 1 << 40, 0, 512, dev_mode=False, quantized=True)
    assert summary["weights_bytes"] == plan.weights_bytes == weight_layout(cfg, g, dtype, quantized=True).total_bytes
    dense = vram_plan_summary(cfg, g, kv_mb)  # the default residency
    dense_plan = plan_vram(cfg, g, dtype, kv_mb, 1 << 40, 0, 512, dev_mode=False)
    assert dense["weights_bytes"] == dense_plan.weights_bytes == weight_layout(cfg, g, dtype).total_bytes
    assert dense["weights_bytes_quantized"] == summary["weights_bytes"]
    half2 = vram_plan_summary(cfg, g, kv_mb, "quantized-half2")  # the same bytes, other arithmetic
    assert {**half2, "resident_weights": "quantized"} == summary
    assert summary["max_context"] == plan.max_seq_len
    assert summary["kv_cache_bytes"] == plan.kv_cache_bytes
    at_load = sorted({t.type_name for t in g.tensors if t.type_name in ("Q2_K", "Q3_K")})
    assert summary["dequantized_at_load_types"] == at_load  # counted dense (16-bit) in the quantized plan
    if not at_load:  # the 1.05x target holds where every matrix has a fused kernel
        assert summary["weights_bytes"] <= 1.05 * g.tensor_bytes + 256 * len(g.tensors)
    if wtype in ("F16", "Q2_K"):  # nothing stays blocks: the quantized plan is the dense one minus fusing
        assert plan.weights_bytes >= weight_layout(cfg, g, dtype).total_bytes
    else:  # quantized residency is smaller than the dense fp16 plan
        assert plan.weights_bytes < weight_layout(cfg, g, dtype).total_bytes


def test_worker_4103_inspect_json_has_vram_plan(q4km: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-m", "worker_orcd", "inspect", str(q4km), "--json", "--kv-cache-size-mb", "1"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    plan = json.loads(out.stdout)["vram_plan"]
    g = parse_file(q4km)
    cfg = model_config(g)
    assert plan["kv_bytes_per_token"] == 2 * cfg.n_layers * cfg.kv_dim * 2
    pool = (1 << 20) // plan["kv_bytes_per_token"] // 16 * 16  # whole 16-token blocks
    assert plan["kv_pool_tokens"] == pool
    assert plan["max_context"] == min(cfg.context_length, pool)
    assert plan["kv_cache_bytes"] == (pool + 16) * plan["kv_bytes_per_token"]  # + the runner's scratch block
    assert plan["resident_weights"] == "dense"
    assert plan["weights_bytes"] == weight_layout(cfg, g, torch.float16).total_bytes
    assert plan["weights_bytes_quantized"] == weight_layout(cfg, g, torch.float16, quantized=True).total_bytes
    assert plan["weights_and_kv_bytes"] == plan["weights_bytes"] + plan["kv_cache_bytes"]


@pytest.fixture(scope="module")
def q3km(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write_synthetic_model(tmp_path_factory.mktemp("q3") / "tiny-q3km.gguf", "tiny-llama", "Q3_K_M")


def test_worker_4701_q3_k_dequantized_at_load_in_quantized_residency(q3km: Path) -> None:
    """Q3_K has no fused matmul: in the quantized residency its matrices get dense slots (dequantized
    at load), alone as dense tensors and inside Q/K/V beside the Q5_K part that stays blocks."""
    g, cfg, lay, w, _ = _resident(q3km, quantized=True)
    lw = w.layers[0]
    assert isinstance(lw.wqkv, WeightGroup)
    assert [p.ggml_type for p in lw.wqkv.parts] == [GGMLType.F32, GGMLType.F32, GGMLType.Q5_K]
    assert isinstance(lw.w_gate_up, WeightGroup) and {p.ggml_type for p in lw.w_gate_up.parts} == {GGMLType.F32}
    assert isinstance(lw.w_down, QWeight) and lw.w_down.ggml_type == GGMLType.Q4_K
    assert isinstance(lw.wo, torch.Tensor) and isinstance(w.embed, torch.Tensor)  # Q3_K alone: dense
    assert isinstance(w.lm_head, QWeight) and w.lm_head.ggml_type == GGMLType.Q6_K
    for name in ("blk.0.attn_q.weight", "blk.0.attn_output.weight", "token_embd.weight"):
        assert g.tensor(name).ggml_type == GGMLType.Q3_K and lay.slots[name].ggml_type is None, name
    data = q3km.read_bytes()
    info, s = g.tensor("blk.1.attn_v.weight"), lay.slots["blk.1.attn_v.weight"]
    assert s.ggml_type == GGMLType.Q5_K  # the fused part is still the verified file bytes
    resident = w.arena[s.byte_offset : s.byte_offset + s.n_bytes].numpy().tobytes()
    assert resident == data[info.data_offset : info.data_offset + info.n_bytes]


def test_worker_4701_q3_k_model_generates_same_in_both_residencies(q3km: Path) -> None:
    """Greedy decoding over the Q3_K_M model: the quantized residency (Q3_K dequantized at load,
    the rest blocks) gives the dense residency's logits bit for bit, token after token."""
    *_, dense = _resident(q3km, quantized=False)
    *_, quant = _resident(q3km, quantized=True)
    ids = [1, 5, 9]
    with torch.no_grad():
        for _ in range(4):
            want = dense.prefill_logits(ids)
            assert torch.isfinite(want).all()
            assert torch.equal(quant.prefill_logits(ids), want)
            ids.append(int(want.argmax()))
        ops.use_kernels_on_cpu(True)  # the interpreted kernels over the mixed group and the dense Q3_K slots
        try:
            tokens = torch.tensor(ids)
            assert torch.equal(quant.model.embed(tokens), dense.model.embed(tokens))
            lw, dw = quant.model.w.layers[1], dense.model.w.layers[1]
            for got_w, ref_w in ((lw.wqkv, dw.wqkv), (lw.wo, dw.wo), (lw.w_gate_up, dw.w_gate_up)):
                h = torch.randn(2, ref_w.shape[1])
                got = ops.linear(h, got_w)
                ref = h.double() @ ref_w.double().t()
                assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-6
        finally:
            ops.use_kernels_on_cpu(False)


def test_worker_4701_inspect_json_says_q3_k_is_dequantized_at_load(q3km: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "worker_orcd", "inspect", str(q3km)]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, check=True)
    rep = json.loads(out.stdout)
    at_load = {t["type"]: t["dequantized_at_load"] for t in rep["tensors"]["types"]}
    assert at_load == {"F32": False, "Q3_K": True, "Q4_K": False, "Q5_K": False, "Q6_K": False}
    assert rep["ecp"]["quant_dequantized_at_load"] == ["Q2_K", "Q3_K"]
    assert set(rep["ecp"]["quant_dequantized_at_load"]) <= set(rep["ecp"]["supports_quant"])
    assert rep["vram_plan"]["dequantized_at_load_types"] == ["Q3_K"]
    assert rep["match"]["accepted"]
    text = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    assert "Q3_K" in text and "dequantized at load" in text
