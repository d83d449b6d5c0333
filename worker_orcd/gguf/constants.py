"""GGUF format constants: value types, ggml tensor types and their block layout.

Numbers follow ggml's ``ggml.h``/``gguf.h`` (and llama.cpp's gguf-py); a unit
test checks them against the ``gguf`` package so they cannot drift silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format (little-endian) and byte size of each fixed-size value type
SCALAR_FORMATS: dict[ValueType, tuple[str, int]] = {
    ValueType.UINT8: ("<B", 1),
    ValueType.INT8: ("<b", 1),
    ValueType.UINT16: ("<H", 2),
    ValueType.INT16: ("<h", 2),
    ValueType.UINT32: ("<I", 4),
    ValueType.INT32: ("<i", 4),
    ValueType.FLOAT32: ("<f", 4),
    ValueType.BOOL: ("<B", 1),
    ValueType.UINT64: ("<Q", 8),
    ValueType.INT64: ("<q", 8),
    ValueType.FLOAT64: ("<d", 8),
}


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


@dataclass(frozen=True)
class BlockLayout:
    block_size: int  # elements per block
    type_size: int  # bytes per block


# (elements per block, bytes per block) for every known ggml type
BLOCK_LAYOUT: dict[GGMLType, BlockLayout] = {
    GGMLType.F32: BlockLayout(1, 4),
    GGMLType.F16: BlockLayout(1, 2),
    GGMLType.Q4_0: BlockLayout(32, 18),
    GGMLType.Q4_1: BlockLayout(32, 20),
    GGMLType.Q5_0: BlockLayout(32, 22),
    GGMLType.Q5_1: BlockLayout(32, 24),
    GGMLType.Q8_0: BlockLayout(32, 34),
    GGMLType.Q8_1: BlockLayout(32, 40),
    GGMLType.Q2_K: BlockLayout(256, 84),
    GGMLType.Q3_K: BlockLayout(256, 110),
    GGMLType.Q4_K: BlockLayout(256, 144),
    GGMLType.Q5_K: BlockLayout(256, 176),
    GGMLType.Q6_K: BlockLayout(256, 210),
    GGMLType.Q8_K: BlockLayout(256, 292),
    GGMLType.IQ2_XXS: BlockLayout(256, 66),
    GGMLType.IQ2_XS: BlockLayout(256, 74),
    GGMLType.IQ3_XXS: BlockLayout(256, 98),
    GGMLType.IQ1_S: BlockLayout(256, 50),
    GGMLType.IQ4_NL: BlockLayout(32, 18),
    GGMLType.IQ3_S: BlockLayout(256, 110),
    GGMLType.IQ2_S: BlockLayout(256, 82),
    GGMLType.IQ4_XS: BlockLayout(256, 136),
    GGMLType.I8: BlockLayout(1, 1),
    GGMLType.I16: BlockLayout(1, 2),
    GGMLType.I32: BlockLayout(1, 4),
    GGMLType.I64: BlockLayout(1, 8),
    GGMLType.F64: BlockLayout(1, 8),
    GGMLType.IQ1_M: BlockLayout(256, 56),
    GGMLType.BF16: BlockLayout(1, 2),
    GGMLType.TQ1_0: BlockLayout(256, 54),
    GGMLType.TQ2_0: BlockLayout(256, 66),
    GGMLType.MXFP4: BlockLayout(32, 17),
}


# Nesting is parsed recursively; above this a hostile file could exhaust the stack.
MAX_ARRAY_NESTING_CEILING = 64


@dataclass(frozen=True)
class Limits:
    """Parser limits (SPEC 4311). Each can be lowered by the caller, never disabled.

    ``max_file_size`` is MAX_MODEL_SIZE (SPEC 4225) and may also be raised by
    configuration. The last two bound what a header can cost in host memory
    and parse time no matter how large the file is allowed to be.
    """

    max_file_size: int = 100 * 10**9  # MAX_MODEL_SIZE, 100 GB
    max_tensors: int = 10_000
    max_kv_pairs: int = 1_000
    max_string_bytes: int = 64 * 1024
    # Tokenizer arrays hold ~150k-260k short strings; bound arrays separately.
    max_array_len: int = 1 << 22
    max_array_nesting: int = 4
    # Real headers are 5-15 MB (gemma3: 6.5 MB); everything before the tensor data.
    max_header_bytes: int = 128 * 2**20
    # Array elements over all metadata, nested included (gemma3: ~790k).
    max_metadata_elements: int = 1 << 23

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if type(value) is not int or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int, got {value!r}")
        if self.max_array_nesting > MAX_ARRAY_NESTING_CEILING:
            raise ValueError(f"Limits.max_array_nesting must be <= {MAX_ARRAY_NESTING_CEILING}, got {self.max_array_nesting}")
