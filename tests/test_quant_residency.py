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
from worker_orcd.engine.weights import bind, weight_layout
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
        resident = w.arena[s.byte_offset : s.byte_offset + s.n_bytes].numpy().tobytes()
        assert resident == data[info.data_offset : info.data_offset + info.n_bytes], name
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


@pytest.mark.parametrize(("shape", "wtype"), [("tiny-qwen2", "Q4_K_M"), ("tiny-llama", "Q8_0"), ("tiny-gemma3", "F16")])
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
    assert summary["max_context"] == plan.max_seq_len
    assert summary["kv_cache_bytes"] == plan.kv_cache_bytes
    assert summary["weights_bytes"] <= 1.05 * g.tensor_bytes + 256 * len(g.tensors)
    if wtype != "F16":  # quantized residency is smaller than the dense fp16 plan
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
