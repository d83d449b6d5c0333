"""One rank's slice of the resident weights (Megatron layout; the rules are in ``tp_plan.py``).

The dense residency (CPU development mode, and the GPU's ``dense`` default) is sliced AFTER
dequantization: the whole file is uploaded (and re-hashed) into a full arena as for tp=1, this
rank's rows/columns are copied into a new, smaller arena, and the full one is dropped, so what
stays resident, is fingerprinted and sealed is the shard alone. Slicing dense values has no
block boundaries to respect. Quantized residency (GGUF blocks stay resident) would have to split
row-parallel matrices along K, i.e. on block boundaries: ``check_block_split`` says when that
is possible; the engine refuses ``quantized`` with tp > 1 for now (a K-quant's 256-element
blocks do not divide e.g. Qwen2.5-0.5B's ffn 4864 / 2).
"""

from __future__ import annotations

import torch

from ..errors import ModelLoadError
from ..gguf.constants import BLOCK_LAYOUT, GGMLType
from .config import ModelConfig
from .weights import Slot, WeightLayout, views

# slot suffix -> how it splits; everything else (embed, lm_head, norms) is replicated
COLUMN_PARALLEL = ("wqkv", "bqkv", "w_gate_up")  # split dim 0 within each fused part
ROW_PARALLEL = ("wo", "w_down")  # split dim 1


def _kind(slot_name: str) -> str:
    leaf = slot_name.rsplit(".", 1)[-1]
    if leaf in COLUMN_PARALLEL:
        return "column"
    if leaf in ROW_PARALLEL:
        return "row"
    return "replicated"


def fused_parts(cfg: ModelConfig, slot_name: str) -> tuple[int, ...]:
    """Sizes along dim 0 of the tensors fused into a column-parallel slot (full model)."""
    leaf = slot_name.rsplit(".", 1)[-1]
    if leaf in ("wqkv", "bqkv"):
        return (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)
    if leaf == "w_gate_up":
        return (cfg.ffn_dim, cfg.ffn_dim)
    raise ValueError(f"{slot_name} is not column-parallel")


def column_shard(t: torch.Tensor, parts: tuple[int, ...], rank: int, degree: int) -> torch.Tensor:
    """Rows of each fused part's ``rank``-th 1/degree, concatenated in part order (a copy)."""
    out, off = [], 0
    for n in parts:
        if n % degree:
            raise ModelLoadError(f"a fused part of {n} rows does not split into {degree} shards")
        step = n // degree
        out.append(t[off + rank * step : off + (rank + 1) * step])
        off += n
    if off != t.shape[0]:
        raise ModelLoadError(f"fused parts cover {off} of {t.shape[0]} rows")
    return torch.cat(out, dim=0)


def row_shard(t: torch.Tensor, rank: int, degree: int) -> torch.Tensor:
    """The ``rank``-th 1/degree of the input columns (a copy)."""
    k = t.shape[1]
    if k % degree:
        raise ModelLoadError(f"{k} input columns do not split into {degree} shards")
    step = k // degree
    return t[:, rank * step : (rank + 1) * step].contiguous()


def check_block_split(ggml_type: GGMLType, k: int, degree: int) -> None:
    """A quantized matrix split along K keeps whole blocks only if K/degree is a multiple of the block size."""
    block = BLOCK_LAYOUT[ggml_type].block_size
    if k % degree or (k // degree) % block:
        raise ModelLoadError(
            f"a {ggml_type.name} matrix with K={k} cannot be split into {degree} shards on {block}-element block "
            "boundaries; load it dense (--resident-weights dense) for tensor parallel"
        )


def shard_tensor(t: torch.Tensor, slot_name: str, cfg: ModelConfig, rank: int, degree: int) -> torch.Tensor:
    """Rank ``rank``'s slice of the full slot ``slot_name`` (replicated slots: the tensor itself)."""
    kind = _kind(slot_name)
    if kind == "column":
        return column_shard(t, fused_parts(cfg, slot_name), rank, degree)
    if kind == "row":
        return row_shard(t, rank, degree)
    return t


def shard_layout(full: WeightLayout, cfg: ModelConfig, degree: int) -> WeightLayout:
    """The dense layout of one shard: the same slot names, 1/degree of the split dimension."""
    if full.quantized or full.groups:
        raise ModelLoadError("tensor parallel needs the dense residency (--resident-weights dense)")
    lay = WeightLayout(full.dtype)
    for s in full.slots.values():
        shape = list(s.shape)
        kind = _kind(s.name)
        if kind == "column":
            shape[0] //= degree
        elif kind == "row":
            shape[1] //= degree
        n = 1
        for d in shape:
            n *= d
        lay._reserve(Slot(s.name, tuple(shape), lay.total_bytes, n * full.dtype.itemsize))
    return lay


@torch.no_grad()
def shard_arena(
    arena: torch.Tensor, full: WeightLayout, cfg: ModelConfig, rank: int, degree: int
) -> tuple[torch.Tensor, WeightLayout]:
    """A new arena holding only rank ``rank``'s slices of the full ``arena``; the caller drops the full one."""
    lay = shard_layout(full, cfg, degree)
    out = torch.empty(lay.total_bytes, dtype=torch.uint8, device=arena.device)
    src, dst = views(arena, full), views(out, lay)
    for name, view in dst.items():
        view.copy_(shard_tensor(src[name], name, cfg, rank, degree))
    return out, lay
