"""GGUF block dequantization on the device: Triton kernels, torch reference for CPU dev mode.

The loader streams raw tensor bytes (exactly as in the file) to the device and
calls ``dequantize`` per chunk of whole blocks; weights never pass through a
host-side float copy (SPEC 4100-4102).

Names are resolved lazily (PEP 562) so the host layer can read the torch-free
``formats.SUPPORTED_TYPES`` (the ECP's quant list) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers
    from .api import dequantize
    from .bench import bench_dequant
    from .formats import SUPPORTED_TYPES
    from .reference import dequantize_reference
    from .validate import OUT_DTYPES, DequantError

_EXPORTS = {
    "OUT_DTYPES": ".validate",
    "SUPPORTED_TYPES": ".formats",
    "DequantError": ".validate",
    "bench_dequant": ".bench",
    "dequantize": ".api",
    "dequantize_reference": ".reference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
