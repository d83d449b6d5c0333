"""What the engine really runs, as plain data: the source of the ECP (SPEC 4610-4611).

The SPEC demands the ECP be TRUE, so this lists only what the kernels and the
forward passes implement today; the engine team extends it together with the
code, and a test cross-checks it against the implemented dequantizers and
model graphs. Importing this module must never import torch (the host layer
builds the readiness callback from it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..capability import ECP
from ..errors import InvalidParams


@dataclass(frozen=True)
class EngineProfile:
    architectures: tuple[str, ...]  # general.architecture values with a forward pass in engine/model.py
    positional: tuple[str, ...]
    attention: tuple[str, ...]
    quant: tuple[str, ...]  # ggml tensor types engine/dequant.py can turn into compute dtype
    max_context: int  # longest KV cache (tokens) the engine allocates


ENGINE_PROFILE = EngineProfile(
    architectures=("llama", "qwen2", "gemma3"),
    positional=("rope_llama", "rope_neox"),
    attention=("mha", "gqa", "mqa"),
    quant=("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"),
    max_context=131072,
)


def build_ecp(worker_id: str, vram_bytes: int, profile: EngineProfile = ENGINE_PROFILE) -> ECP:
    """The ECP this worker advertises; ``vram_bytes`` is measured by the engine at startup."""
    if not worker_id:
        raise InvalidParams("worker_id must be non-empty")
    if vram_bytes < 0:
        raise InvalidParams(f"vram_bytes must be >= 0, got {vram_bytes}")
    return ECP(
        worker_id=worker_id,
        supports_positional=profile.positional,
        supports_attention=profile.attention,
        supports_quant=profile.quant,
        max_context=profile.max_context,
        vram_bytes=vram_bytes,
        supports_architecture=profile.architectures,
    )
