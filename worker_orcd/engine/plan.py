"""The VRAM plan (SPEC 4103, 4210-4214): what a load would allocate, from the header alone.

Weights at the resident dtype, the KV cache for S_max tokens, scratch
(activations of one prefill chunk, logits, the decode graph's pool, load
staging, cuBLAS workspaces) and a stated margin, against free device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ErrorCode, WorkerError
from ..gguf import GGUFFile
from .config import ModelConfig
from .paged_kv import SCRATCH_BLOCKS, BLOCK_SIZE, bytes_per_token, kv_tokens, max_seq_len
from .upload import CHUNK_BYTES, RING
from .weights import weight_layout

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

    @property
    def required_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.scratch_bytes + self.margin_bytes

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
            f"scratch {self.scratch_bytes} + margin {self.margin_bytes}); device id {self.gpu_device}",
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
        }


def scratch_bytes(cfg: ModelConfig, dtype: torch.dtype, prefill_chunk: int, s_max: int, dev_mode: bool) -> int:
    """Upper bound of everything besides weights and KV: activations, logits, graph pool, staging."""
    e = dtype.itemsize
    per_token = (4 * cfg.d_model + 2 * cfg.qkv_dim + 2 * cfg.q_dim + 3 * cfg.ffn_dim) * e
    prefill = 2 * min(prefill_chunk, s_max) * per_token  # x2: temporaries alive across one layer
    if dev_mode:  # the CPU reference attention materialises [Hq, chunk, S] scores in fp32
        prefill += 2 * cfg.n_heads * min(prefill_chunk, s_max) * s_max * 8  # float64 scores
    logits = 4 * cfg.vocab_size * 4
    graph_pool = 4 * per_token + 2 * cfg.vocab_size * 4 + 64 * cfg.n_heads * cfg.head_dim * 4 * 3
    staging = RING * CHUNK_BYTES * (1 if dev_mode else 2)  # host ring (+ device ring on CUDA)
    history = s_max * 8
    if not dev_mode:
        # captured decode graphs (runner.DECODE_BUCKETS, up to 256 rows): one shared pool holding
        # the largest bucket's activations, plus each bucket's static fp32 logits
        graph_pool += 256 * per_token + 2 * 256 * cfg.vocab_size * 4 * 2
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
) -> VramPlan:
    """Pure arithmetic over the header: what loading would allocate, against ``free_bytes``."""
    lay = weight_layout(cfg, g, dtype, quantized=quantized and not dev_mode)
    s_max = max_seq_len(cfg, dtype, kv_cache_mb, dev_mode)
    kv = (kv_tokens(cfg, dtype, kv_cache_mb, dev_mode) + SCRATCH_BLOCKS * BLOCK_SIZE) * bytes_per_token(cfg, dtype)
    margin = FIXED_MARGIN_BYTES + int(MARGIN_FRACTION * (lay.total_bytes + kv))
    return VramPlan(
        gpu_device=gpu_device,
        dtype=str(dtype).removeprefix("torch."),
        max_seq_len=s_max,
        weights_bytes=lay.total_bytes,
        kv_cache_bytes=kv,
        scratch_bytes=scratch_bytes(cfg, dtype, prefill_chunk, s_max, dev_mode),
        margin_bytes=margin,
        free_bytes=free_bytes,
        dev_mode=dev_mode,
    )
