"""The KV cache: preallocated once, bounded, in device memory (SPEC 4100, 4702, 4420-4423).

``[n_layers, S_max, Hk, D]`` for K and for V, allocated at load and never
resized, so a request can never grow memory; requests that would not fit are
refused before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidParams, ModelLoadError
from .config import ModelConfig

MIN_SEQ_LEN = 16


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * cfg.n_layers * cfg.kv_dim * dtype.itemsize


def max_seq_len(cfg: ModelConfig, dtype: torch.dtype, kv_cache_mb: int | None) -> int:
    """S_max = min(model context, what kv_cache_mb holds); the whole context when no budget is set."""
    if kv_cache_mb is None:
        return cfg.context_length
    if isinstance(kv_cache_mb, bool) or not isinstance(kv_cache_mb, int) or kv_cache_mb <= 0:
        raise InvalidParams(f"kv_cache_mb must be a positive integer, got {kv_cache_mb!r}")
    fits = kv_cache_mb * (1 << 20) // bytes_per_token(cfg, dtype)
    if fits < MIN_SEQ_LEN:
        raise ModelLoadError(
            f"kv_cache_mb={kv_cache_mb} holds only {fits} tokens of this model "
            f"({bytes_per_token(cfg, dtype)} bytes per token); at least {MIN_SEQ_LEN} are needed"
        )
    return min(cfg.context_length, fits)


@dataclass
class KVCache:
    k: torch.Tensor  # [n_layers, S_max, Hk, D]
    v: torch.Tensor

    @classmethod
    def allocate(cls, cfg: ModelConfig, s_max: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        shape = (cfg.n_layers, s_max, cfg.n_kv_heads, cfg.head_dim)
        # zeros, not empty: a stale slot must never hold NaN that a masked-out lane could touch
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[1]

    @property
    def n_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def check_request(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse, before any work, a request whose prompt + output cannot fit (SPEC 4420-4423)."""
        check_capacity(prompt_len, max_tokens, self.max_seq_len)


def check_capacity(prompt_len: int, max_tokens: int, s_max: int) -> None:
    if prompt_len <= 0:
        raise InvalidParams("prompt must contain at least one token")
    if max_tokens <= 0:
        raise InvalidParams(f"max_tokens must be positive, got {max_tokens}")
    if prompt_len + max_tokens > s_max:
        raise InvalidParams(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the KV cache capacity "
            f"S_max ({s_max} tokens); shorten the prompt or lower max_tokens"
        )
