"""What the engine really runs, as plain data: the source of the ECP (SPEC 4610-4611).

The SPEC demands the ECP be TRUE, so nothing here is typed by hand: every field
is read from the registry the engine itself checks when it loads a model
(``config.py``: architectures, their RoPE variant, attention layouts, max
context; ``dequant/formats.py``: tensor types). ``tests/test_ecp_truth.py``
loads a tiny model of every advertised (architecture x type) and runs a step.
Importing this module must never import torch (the host layer builds the
readiness callback from it), so those registries stay torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..capability import ECP
from ..errors import InvalidParams
from .config import ATTENTION_KINDS, MAX_CONTEXT, ROPE_BY_ARCH
from .dequant.formats import DEQUANTIZED_AT_LOAD_TYPES, SUPPORTED_TYPES


@dataclass(frozen=True)
class EngineProfile:
    architectures: tuple[str, ...]  # general.architecture values with a forward pass in engine/model.py
    positional: tuple[str, ...]
    attention: tuple[str, ...]
    quant: tuple[str, ...]  # ggml tensor types the engine loads (weights.py refuses the rest)
    max_context: int  # longest context a model may declare (config.py refuses longer)
    # of ``quant``, the types with no fused matmul: their matrices are dequantized at load in every residency
    quant_dequantized_at_load: tuple[str, ...] = ()


def derive_profile() -> EngineProfile:
    """The profile as the engine's registries define it today (ordered: stable ECP JSON)."""
    return EngineProfile(
        architectures=tuple(ROPE_BY_ARCH),
        positional=tuple(sorted(set(ROPE_BY_ARCH.values()))),
        attention=ATTENTION_KINDS,
        quant=tuple(t.name for t in sorted(SUPPORTED_TYPES)),
        max_context=MAX_CONTEXT,
        quant_dequantized_at_load=tuple(t.name for t in sorted(DEQUANTIZED_AT_LOAD_TYPES)),
    )


ENGINE_PROFILE = derive_profile()


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
        quant_dequantized_at_load=profile.quant_dequantized_at_load,
    )
