"""GGUF block dequantization on the device: Triton kernels, torch reference for CPU dev mode.

The loader streams raw tensor bytes (exactly as in the file) to the device and
calls ``dequantize`` per chunk of whole blocks; weights never pass through a
host-side float copy (SPEC 4100-4102).
"""

from __future__ import annotations

from .api import dequantize
from .bench import bench_dequant
from .formats import OUT_DTYPES, SUPPORTED_TYPES
from .reference import dequantize_reference
from .validate import DequantError

__all__ = [
    "OUT_DTYPES",
    "SUPPORTED_TYPES",
    "DequantError",
    "bench_dequant",
    "dequantize",
    "dequantize_reference",
]
