"""What the CUDA engine keeps resident for a model, from the GGUF header alone, without torch.

``inspect --json`` reports it as ``vram_plan`` on machines with no GPU (host
layer: no torch here). The numbers are those ``plan.plan_vram`` uses for the
CUDA engine's INSUFFICIENT_VRAM check (tests hold the two equal): matrices stay
GGUF blocks (``weights.py``, quantized residency) unless their type has no fused
kernel (Q2_K, Q3_K: dense, one slot per tensor), 1-D tensors (norms, the
fused Q/K/V bias) are 16-bit, every slot rounded up to the arena alignment;
the KV cache is 16-bit K and V per layer and token.
"""

from __future__ import annotations

from typing import Any

from ..gguf import GGUFFile
from .config import ModelConfig
from .dequant.formats import FUSED_TYPES

ARENA_ALIGN = 256  # bytes, as weights.ARENA_ALIGN
RESIDENT_ITEMSIZE = 2  # fp16 (bf16 for Gemma 3) activations, KV cache and dense weights on CUDA
MIN_SEQ_LEN = 16  # the smallest KV pool a load accepts
KV_BLOCK_SIZE = 16  # tokens per paged-KV block (paged_kv.py); one extra block is the runner's scratch
# With no --kv-cache-size-mb: a pool of this many full contexts (GPU) / one (CPU dev mode).
DEFAULT_CONTEXTS_CUDA = 4
DEFAULT_CONTEXTS_CPU = 1


def _aligned(n: int) -> int:
    return -(-n // ARENA_ALIGN) * ARENA_ALIGN


RESIDENCIES = ("dense", "quantized", "quantized-half2")  # --resident-weights (both quantized: the same bytes)


def _fused_key(name: str, matrices: bool) -> str:
    """The arena slot a tensor lands in: Q/K/V (and gate/up, dense matrices only) share one."""
    for part in ("attn_q.", "attn_k.", "attn_v."):
        if part + "bias" in name or (matrices and part + "weight" in name):
            return name.replace(part, "attn_qkv.")
    if matrices:
        for part in ("ffn_gate.weight", "ffn_up.weight"):
            name = name.replace(part, "ffn_gate_up.weight")
    return name


def resident_weight_bytes(g: GGUFFile, itemsize: int = RESIDENT_ITEMSIZE, quantized: bool = False) -> int:
    """Arena bytes of the weights as weights.py lays them out.

    quantized: raw GGUF blocks per matrix of a fused type, a dense slot per other matrix, dense
    1-D slots; dense: every tensor dequantized to ``itemsize`` bytes per element, Q/K/V and
    gate/up fused into one matrix each.
    """
    total = 0
    dense: dict[str, int] = {}
    for t in g.tensors:
        if quantized and len(t.shape) >= 2:
            total += _aligned(t.n_bytes if t.ggml_type in FUSED_TYPES else t.n_elements * itemsize)
        else:
            key = _fused_key(t.name, matrices=not quantized)
            dense[key] = dense.get(key, 0) + t.n_elements * itemsize
    return total + sum(_aligned(n) for n in dense.values())


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int = RESIDENT_ITEMSIZE) -> int:
    return 2 * cfg.n_layers * cfg.kv_dim * itemsize


def kv_pool_tokens(
    cfg: ModelConfig, kv_cache_mb: int | None, itemsize: int = RESIDENT_ITEMSIZE, dev_mode: bool = False
) -> int:
    """Tokens the paged KV pool holds for all jobs together (a multiple of the block size; 0 if < 16)."""
    if kv_cache_mb is None:
        n = cfg.context_length * (DEFAULT_CONTEXTS_CPU if dev_mode else DEFAULT_CONTEXTS_CUDA)
    else:
        n = kv_cache_mb * (1 << 20) // kv_bytes_per_token(cfg, itemsize)
        if n < MIN_SEQ_LEN:
            return 0
    return n // KV_BLOCK_SIZE * KV_BLOCK_SIZE


def max_context(
    cfg: ModelConfig, kv_cache_mb: int | None, itemsize: int = RESIDENT_ITEMSIZE, dev_mode: bool = False
) -> int:
    """The longest job (prompt + output): the model's context, or the whole pool if smaller; 0 if < 16."""
    return min(cfg.context_length, kv_pool_tokens(cfg, kv_cache_mb, itemsize, dev_mode))


def kv_cache_bytes(cfg: ModelConfig, kv_cache_mb: int | None, itemsize: int = RESIDENT_ITEMSIZE, dev_mode: bool = False) -> int:
    """Bytes of the paged pool as allocated: its blocks plus the scratch block."""
    pool = kv_pool_tokens(cfg, kv_cache_mb, itemsize, dev_mode)
    return (pool + KV_BLOCK_SIZE) * kv_bytes_per_token(cfg, itemsize) if pool else 0


def vram_plan_summary(
    cfg: ModelConfig, g: GGUFFile, kv_cache_mb: int | None, resident_weights: str = "dense"
) -> dict[str, Any]:
    """The ``vram_plan`` object of ``inspect --json`` (bytes; scratch and margin are the engine's)."""
    weights = resident_weight_bytes(g, quantized=resident_weights.startswith("quantized"))
    per_token = kv_bytes_per_token(cfg)
    ctx = max_context(cfg, kv_cache_mb)
    kv = kv_cache_bytes(cfg, kv_cache_mb)
    return {
        "engine": "cuda",
        "resident_weights": resident_weights,
        "weights_bytes": weights,
        "weights_bytes_quantized": resident_weight_bytes(g, quantized=True),
        "file_tensor_bytes": g.tensor_bytes,
        "kv_bytes_per_token": per_token,
        "kv_cache_size_mb": kv_cache_mb,
        "kv_pool_tokens": kv_pool_tokens(cfg, kv_cache_mb),
        "max_context": ctx,
        "kv_cache_bytes": kv,
        "weights_and_kv_bytes": weights + kv,
        # matrices with no fused kernel: dense (16-bit) in the quantized residency too
        "dequantized_at_load_types": sorted(
            {t.type_name for t in g.tensors if len(t.shape) >= 2 and t.ggml_type not in FUSED_TYPES}
        ),
    }


# --- tensor parallel (the split rules are tp_plan.py's; the engine slices in shard.py) ----------

# GGUF tensor name parts by how a tensor splits across ranks; everything else is replicated.
_COLUMN_PARALLEL = ("attn_q.", "attn_k.", "attn_v.", "ffn_gate.", "ffn_up.")  # weight and bias: split by rows
_ROW_PARALLEL = ("attn_output.weight", "ffn_down.weight")  # split by input columns


def tp_split_kind(name: str) -> str:
    """``column``, ``row`` or ``replicated``: how tensor ``name`` is divided among the ranks."""
    if any(part in name for part in _COLUMN_PARALLEL):
        return "column"
    if any(part in name for part in _ROW_PARALLEL):
        return "row"
    return "replicated"


def tp_weight_bytes(g: GGUFFile, degree: int, itemsize: int) -> dict[str, int]:
    """One rank's dense weights at ``itemsize`` bytes per element (every rank holds the same amount).

    ``sharded_bytes``: its 1/degree of the column- and row-parallel tensors; ``replicated_bytes``:
    every other tensor, whole; ``arena_bytes``: what it allocates, slot by slot rounded up to the
    arena alignment as ``shard.shard_layout`` does (Q/K/V and gate/up fused, as ``weights.py``).
    The caller has checked that heads, KV heads and the FFN width divide by ``degree``.
    """
    sharded = replicated = 0
    slots: dict[str, int] = {}
    for t in g.tensors:
        n = t.n_elements * itemsize
        if tp_split_kind(t.name) == "replicated":
            replicated += n
        else:
            if n % degree:
                raise ValueError(f"tensor {t.name} of {t.n_elements} elements does not split into {degree} shards")
            n //= degree
            sharded += n
        key = _fused_key(t.name, matrices=True)
        slots[key] = slots.get(key, 0) + n
    return {
        "sharded_bytes": sharded,
        "replicated_bytes": replicated,
        "arena_bytes": sum(_aligned(n) for n in slots.values()),
    }
