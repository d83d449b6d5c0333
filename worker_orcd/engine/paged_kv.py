"""The paged KV cache: fixed-size blocks of token K/V, preallocated once, shared by every running job.

``[n_layers, n_blocks + 1, block_size, Hk, D]`` for K and for V. Physical
block 0 is scratch: padding rows of a captured decode batch write and read
it, so they can never touch a real job's KV. The host's block manager hands
out logical ids 0..n_blocks-1, which live at physical id + 1. Allocated at
load and never resized: a request can never grow device memory (SPEC 4100,
4702, 4420-4423).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidParams, ModelLoadError
from . import vram_budget
from .config import ModelConfig

BLOCK_SIZE = vram_budget.KV_BLOCK_SIZE  # tokens per KV block (vLLM's default): little waste per job, short tables
SCRATCH_BLOCKS = 1


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return vram_budget.kv_bytes_per_token(cfg, dtype.itemsize)


def kv_tokens(cfg: ModelConfig, dtype: torch.dtype, kv_cache_mb: int | None, dev_mode: bool) -> int:
    """Tokens the whole pool holds (a multiple of BLOCK_SIZE); the arithmetic is vram_budget's (torch-free)."""
    if kv_cache_mb is not None and (isinstance(kv_cache_mb, bool) or not isinstance(kv_cache_mb, int) or kv_cache_mb <= 0):
        raise InvalidParams(f"kv_cache_mb must be a positive integer, got {kv_cache_mb!r}")
    n = vram_budget.kv_pool_tokens(cfg, kv_cache_mb, dtype.itemsize, dev_mode)
    if n == 0:
        fits = (kv_cache_mb or 0) * (1 << 20) // bytes_per_token(cfg, dtype)
        raise ModelLoadError(
            f"kv_cache_mb={kv_cache_mb} holds only {fits} tokens of this model "
            f"({bytes_per_token(cfg, dtype)} bytes per token); at least {vram_budget.MIN_SEQ_LEN} are needed"
        )
    return n


def max_seq_len(cfg: ModelConfig, dtype: torch.dtype, kv_cache_mb: int | None, dev_mode: bool) -> int:
    """The longest job (prompt + output): the model's context, or all of the pool if that is smaller."""
    return min(cfg.context_length, kv_tokens(cfg, dtype, kv_cache_mb, dev_mode))


@dataclass
class PagedKVCache:
    k: torch.Tensor  # [n_layers, SCRATCH_BLOCKS + n_blocks, BLOCK_SIZE, Hk, D]
    v: torch.Tensor

    @classmethod
    def allocate(cls, cfg: ModelConfig, n_tokens: int, dtype: torch.dtype, device: torch.device) -> PagedKVCache:
        n_blocks = n_tokens // BLOCK_SIZE
        shape = (cfg.n_layers, SCRATCH_BLOCKS + n_blocks, BLOCK_SIZE, cfg.n_kv_heads, cfg.head_dim)
        # zeros, not empty: a stale slot must never hold NaN that a masked-out lane could touch
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_blocks(self) -> int:
        """Blocks the host may allocate (the scratch block excluded)."""
        return self.k.shape[1] - SCRATCH_BLOCKS

    @property
    def n_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
