"""What the CUDA engine keeps resident for a model, from the GGUF header alone, without torch.

``inspect --json`` reports it as ``vram_plan`` on machines with no GPU (host
layer: no torch here). The numbers are those ``plan.plan_vram`` uses for the
CUDA engine's INSUFFICIENT_VRAM check (tests hold the two equal): matrices stay
GGUF blocks (``weights.py``, quantized residency), 1-D tensors (norms, the
fused Q/K/V bias) are 16-bit, every slot rounded up to the arena alignment;
the KV cache is 16-bit K and V per layer and token.
"""

from __future__ import annotations

from typing import Any

from ..gguf import GGUFFile
from .config import ModelConfig

ARENA_ALIGN = 256  # bytes, as weights.ARENA_ALIGN
RESIDENT_ITEMSIZE = 2  # fp16 (bf16 for Gemma 3) activations, KV cache and dense weights on CUDA
MIN_SEQ_LEN = 16  # as kv_cache.MIN_SEQ_LEN


def _aligned(n: int) -> int:
    return -(-n // ARENA_ALIGN) * ARENA_ALIGN


def resident_weight_bytes(g: GGUFFile, itemsize: int = RESIDENT_ITEMSIZE) -> int:
    """Arena bytes of the quantized-resident layout: raw blocks per matrix, dense 1-D slots."""
    total = 0
    dense: dict[str, int] = {}
    for t in g.tensors:
        if len(t.shape) >= 2:
            total += _aligned(t.n_bytes)
        else:
            key = t.name
            for part in ("attn_q.bias", "attn_k.bias", "attn_v.bias"):
                key = key.replace(part, "attn_qkv.bias")  # fused into one slot
            dense[key] = dense.get(key, 0) + t.n_elements * itemsize
    return total + sum(_aligned(n) for n in dense.values())


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int = RESIDENT_ITEMSIZE) -> int:
    return 2 * cfg.n_layers * cfg.kv_dim * itemsize


def max_context(cfg: ModelConfig, kv_cache_mb: int | None, itemsize: int = RESIDENT_ITEMSIZE) -> int:
    """Tokens of context the KV budget holds (the model's context when no budget is set); 0 if < 16."""
    if kv_cache_mb is None:
        return cfg.context_length
    fits = kv_cache_mb * (1 << 20) // kv_bytes_per_token(cfg, itemsize)
    return min(cfg.context_length, fits) if fits >= MIN_SEQ_LEN else 0


def vram_plan_summary(cfg: ModelConfig, g: GGUFFile, kv_cache_mb: int | None) -> dict[str, Any]:
    """The ``vram_plan`` object of ``inspect --json`` (bytes; scratch and margin are the engine's)."""
    weights = resident_weight_bytes(g)
    per_token = kv_bytes_per_token(cfg)
    ctx = max_context(cfg, kv_cache_mb)
    return {
        "engine": "cuda",
        "weights_bytes": weights,
        "file_tensor_bytes": g.tensor_bytes,
        "kv_bytes_per_token": per_token,
        "kv_cache_size_mb": kv_cache_mb,
        "max_context": ctx,
        "kv_cache_bytes": ctx * per_token,
        "weights_and_kv_bytes": weights + ctx * per_token,
    }
