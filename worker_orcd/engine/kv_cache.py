"""Request capacity against the KV cache (SPEC 4420-4423): refused before any work starts.

The cache itself is paged_kv.py's pool, allocated once at load and never resized.
"""

from __future__ import annotations

from ..errors import InvalidParams


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
