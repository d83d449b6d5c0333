"""GGUF format: constants and the defensive header reader."""

from .constants import BLOCK_LAYOUT, GGMLType, Limits, ValueType
from .reader import GGUFFile, GGUFFormatError, TensorInfo, parse_buffer, parse_file

__all__ = [
    "BLOCK_LAYOUT",
    "GGMLType",
    "GGUFFile",
    "GGUFFormatError",
    "Limits",
    "TensorInfo",
    "ValueType",
    "parse_buffer",
    "parse_file",
]
