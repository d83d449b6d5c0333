"""What the dequantizer accepts (and which of those the fused matmul reads), and per-type launch tiles.

Kept apart from the kernels so validation and the reference path never need
Triton, and so tile sizes live in one place (kernels and benchmarks agree).
No torch here: the ECP (``engine/profile.py``) is derived from ``SUPPORTED_TYPES``
in the torch-free host layer, and so is ``FUSED_TYPES`` (the ECP and inspect say
which types stay blocks and which are dequantized at load).
"""

from __future__ import annotations

from ...gguf.constants import BLOCK_LAYOUT, GGMLType

SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(
    {
        GGMLType.F32,
        GGMLType.F16,
        GGMLType.BF16,
        GGMLType.Q8_0,
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q5_0,
        GGMLType.Q5_1,
        GGMLType.Q4_K,
        GGMLType.Q5_K,
        GGMLType.Q6_K,
        GGMLType.Q2_K,
        GGMLType.Q3_K,
    }
)

# Types the fused dequant-matmul (kernels/qmatmul.py) reads as blocks. A supported type outside
# this set loads, but its matrices are dequantized at load to the resident dtype in both
# residencies (weights.py), and VRAM planning counts them dense (vram_budget.py).
FUSED_TYPES: frozenset[GGMLType] = SUPPORTED_TYPES - {GGMLType.Q2_K, GGMLType.Q3_K}
DEQUANTIZED_AT_LOAD_TYPES: frozenset[GGMLType] = SUPPORTED_TYPES - FUSED_TYPES

FLOAT_TYPES: frozenset[GGMLType] = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})

# Elements produced by one Triton program. 2048 keeps every format's tile a
# power of two (64 x 32-element blocks, 8 x 256-element super-blocks) and big
# enough that launch overhead vanishes against the memory traffic.
ELEMENTS_PER_PROGRAM = 2048


def blocks_per_program(ggml_type: GGMLType) -> int:
    """How many ggml blocks one Triton program dequantizes."""
    return ELEMENTS_PER_PROGRAM // BLOCK_LAYOUT[ggml_type].block_size
