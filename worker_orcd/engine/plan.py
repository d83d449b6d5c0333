"""The VRAM plan (SPEC 4103, 4210-4214): what a load would allocate, from the header alone.

Weights at the resident dtype, the KV cache for S_max tokens, scratch
(activations of one prefill chunk, logits, the decode graph's pool, load
staging, cuBLAS workspaces) and a stated margin, against free device memory.

With tensor parallel (``tp_degree`` T > 1) the plan is one rank's (all ranks need the same): its
1/T of the column/row-parallel weights plus the replicated ones (``vram_budget.tp_weight_bytes``),
1/T of the KV cache (KV heads split; the pool holds as many tokens as at T=1), scratch computed
with the shard's shapes, the same margin. While loading, a rank also holds the split slots still open
in file order at full size (``shard.staging_peak_bytes``: a layer's matrices, not the model), before
the KV cache exists: ``load_peak_bytes``, which ``required_bytes`` covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ErrorCode, WorkerError
from ..gguf import GGUFFile
from .config import ModelConfig
from .kernels.paged_layout import split_keys, split_partial_bytes, split_scratch_slots
from .paged_kv import SCRATCH_BLOCKS, BLOCK_SIZE, bytes_per_token, kv_tokens, max_seq_len
from .shard import staging_peak_bytes
from .tp_plan import shard_config
from .upload import CHUNK_BYTES, RING
from .vram_budget import tp_weight_bytes
from .weights import WeightLayout, weight_layout

CUBLAS_WORKSPACE_BYTES = 2 * 8 * (4 << 20)  # ":4096:8" per stream; main stream + graph-capture stream
FIXED_MARGIN_BYTES = 256 << 20  # Triton/cuBLAS modules loaded lazily, allocator rounding
MARGIN_FRACTION = 0.02  # of weights + KV cache: caching-allocator fragmentation


@dataclass(frozen=True)
class VramPlan:
    gpu_device: int
    dtype: str
    max_seq_len: int
    weights_bytes: int
    kv_cache_bytes: int
    scratch_bytes: int
    margin_bytes: int
    free_bytes: int
    dev_mode: bool
    tp_degree: int = 1
    weights_sharded_bytes: int = 0  # this rank's part of the split (column/row-parallel) tensors, unaligned
    weights_replicated_bytes: int = 0  # the tensors every rank holds whole, unaligned
    load_weights_bytes: int = 0  # full-size split slots staged at once while a shard streams in (T > 1)

    @property
    def resident_bytes(self) -> int:
        """What stays allocated once loaded: weights, KV cache, scratch, margin."""
        return self.weights_bytes + self.kv_cache_bytes + self.scratch_bytes + self.margin_bytes

    @property
    def load_peak_bytes(self) -> int:
        """While loading a shard: its staged slots stand where the KV cache will be (T = 1: resident_bytes)."""
        if self.tp_degree == 1:
            return self.resident_bytes
        return self.resident_bytes - self.kv_cache_bytes + self.load_weights_bytes

    @property
    def required_bytes(self) -> int:
        return max(self.resident_bytes, self.load_peak_bytes)

    @property
    def feasible(self) -> bool:
        return self.required_bytes <= self.free_bytes

    def require(self) -> None:
        """Fail fast, before any allocation, with required/free bytes and the device (SPEC 4103)."""
        if self.feasible:
            return
        where = "host memory (CPU development mode)" if self.dev_mode else f"GPU {self.gpu_device}"
        raise WorkerError(
            f"model needs {self.required_bytes} bytes but {where} has {self.free_bytes} bytes free "
            f"(weights {self.weights_bytes} + KV cache {self.kv_cache_bytes} for {self.max_seq_len} tokens + "
            f"scratch {self.scratch_bytes} + margin {self.margin_bytes})"
            + (f", or {self.load_peak_bytes} while loading a shard of {self.tp_degree} (split tensors are staged whole)"
               if self.tp_degree > 1 else "")
            + f"; device id {self.gpu_device}",
            code=ErrorCode.INSUFFICIENT_VRAM,
        )

    def as_dict(self) -> dict[str, int | str | bool]:
        return {
            "gpu_device": self.gpu_device,
            "dtype": self.dtype,
            "max_seq_len": self.max_seq_len,
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "scratch_bytes": self.scratch_bytes,
            "margin_bytes": self.margin_bytes,
            "required_bytes": self.required_bytes,
            "free_bytes": self.free_bytes,
            "feasible": self.feasible,
            "tp_degree": self.tp_degree,
            "weights_sharded_bytes": self.weights_sharded_bytes,
            "weights_replicated_bytes": self.weights_replicated_bytes,
            "resident_bytes": self.resident_bytes,
            "load_peak_bytes": self.load_peak_bytes,
        }


def quantized_tp_weight_bytes(full: WeightLayout, cfg: ModelConfig, degree: int) -> dict[str, int]:
    """One rank's quantized-resident weights (``tp_weight_bytes``'s keys): the shard layout's arena,
    its split slots' bytes and its replicated slots' bytes (unaligned)."""
    from .shard import shard_layout, slot_kinds

    lay = shard_layout(full, cfg, degree)
    kinds = slot_kinds(full)
    split = sum(s.n_bytes for s in lay.slots.values() if kinds[s.name] != "replicated")
    return {"arena_bytes": lay.total_bytes, "sharded_bytes": split,
            "replicated_bytes": sum(s.n_bytes for s in lay.slots.values()) - split}


def prefill_dequant_bytes(lay: WeightLayout, itemsize: int) -> int:
    """The quantized residency's prefill scratch (``kernels/qmatmul_prefill.py``), for its largest
    layer matrix: the matrix dequantized to the activation dtype plus the planar types' file-order
    blocks. The output head never takes that path (it sees only the sampled rows, fewer than
    PREFILL_MIN_M) and the embedding is a lookup."""
    worst = 0
    for s in lay.slots.values():
        if s.ggml_type is None or s.name in ("token_embd.weight", "output.weight"):
            continue
        n, k = s.shape
        worst = max(worst, n * k * itemsize + s.n_bytes)
    return worst


def scratch_bytes(cfg: ModelConfig, dtype: torch.dtype, prefill_chunk: int, s_max: int, dev_mode: bool) -> int:
    """Upper bound of everything besides weights and KV: activations, logits, graph pool, staging."""
    e = dtype.itemsize
    per_token = (4 * cfg.d_model + 2 * cfg.qkv_dim + 2 * cfg.q_dim + 3 * cfg.ffn_dim) * e
    prefill = 2 * min(prefill_chunk, s_max) * per_token  # x2: temporaries alive across one layer
    if dev_mode:  # the CPU reference attention materialises [Hq, chunk, S] scores in fp32
        prefill += 2 * cfg.n_heads * min(prefill_chunk, s_max) * s_max * 8  # float64 scores
    logits = 4 * cfg.vocab_size * 4
    graph_pool = 4 * per_token + 2 * cfg.vocab_size * 4 + 64 * cfg.n_heads * cfg.head_dim * 4 * 3
    # host ring (+ device ring on CUDA); a load beside the warm-up instead keeps the dense slots' raw blocks
    # (at most api.OVERLAP_DENSE_BYTES = 256 MiB, under these 384 MiB)
    staging = RING * CHUNK_BYTES * (1 if dev_mode else 2)
    history = s_max * 8
    if not dev_mode:
        # captured decode graphs (runner.DECODE_BUCKETS, up to 256 rows): one shared pool holding
        # the largest bucket's activations, plus each bucket's static fp32 logits
        graph_pool += 256 * per_token + 2 * 256 * cfg.vocab_size * 4 * 2
        # the split attention passes' partials (runner._alloc_split)
        s = split_keys(cfg.head_dim, e)
        graph_pool += split_scratch_slots(s_max, s) * split_partial_bytes(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    return prefill + logits + graph_pool + staging + history + (0 if dev_mode else CUBLAS_WORKSPACE_BYTES)


def plan_vram(
    cfg: ModelConfig,
    g: GGUFFile,
    dtype: torch.dtype,
    kv_cache_mb: int | None,
    free_bytes: int,
    gpu_device: int,
    prefill_chunk: int,
    dev_mode: bool,
    quantized: bool = False,
    tp_degree: int = 1,
) -> VramPlan:
    """Pure arithmetic over the header: what loading would allocate, against ``free_bytes``.

    ``tp_degree`` > 1: one rank's plan; a model whose heads / KV heads / FFN width do not divide
    by it, or (quantized) whose row-parallel blocks would be cut, is refused (``ModelLoadError``) as
    a load would be."""
    quantized = quantized and not dev_mode
    scfg = shard_config(cfg, tp_degree)  # refuses what does not split
    lay = weight_layout(cfg, g, dtype, quantized=quantized)
    if quantized:  # the shard's GGUF blocks, exactly as ``shard.py`` lays them out (refuses a split inside a block)
        split = quantized_tp_weight_bytes(lay, cfg, tp_degree) if tp_degree > 1 else {
            "arena_bytes": lay.total_bytes, "sharded_bytes": 0, "replicated_bytes": 0}
    else:
        split = tp_weight_bytes(g, tp_degree, dtype.itemsize)
    weights = lay.total_bytes if tp_degree == 1 else split["arena_bytes"]
    s_max = max_seq_len(cfg, dtype, kv_cache_mb, dev_mode)  # the pool holds as many tokens on every rank
    kv = (kv_tokens(cfg, dtype, kv_cache_mb, dev_mode) + SCRATCH_BLOCKS * BLOCK_SIZE) * bytes_per_token(scfg, dtype)
    margin = FIXED_MARGIN_BYTES + int(MARGIN_FRACTION * (weights + kv))
    return VramPlan(
        gpu_device=gpu_device,
        dtype=str(dtype).removeprefix("torch."),
        max_seq_len=s_max,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        scratch_bytes=scratch_bytes(scfg, dtype, prefill_chunk, s_max, dev_mode)
        + (prefill_dequant_bytes(lay, dtype.itemsize) if quantized else 0),
        margin_bytes=margin,
        free_bytes=free_bytes,
        dev_mode=dev_mode,
        tp_degree=tp_degree,
        weights_sharded_bytes=split["sharded_bytes"],
        weights_replicated_bytes=split["replicated_bytes"],
        load_weights_bytes=0 if tp_degree == 1 else staging_peak_bytes(lay, g),
    )
