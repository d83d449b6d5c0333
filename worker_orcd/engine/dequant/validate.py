"""Argument checks shared by ``dequantize`` and ``dequantize_reference`` (SPEC 4400).

Everything the kernels' index arithmetic relies on is checked here, before any
launch, so a bad call is a typed error naming the kernel, the argument and
the rule, never a device fault or a silently wrong weight.
"""

from __future__ import annotations

import operator

import torch

from ...errors import ErrorCode
from ...gguf.constants import BLOCK_LAYOUT, GGMLType
from ..errors import EngineError, KernelDimensionError
from .formats import SUPPORTED_TYPES, blocks_per_program

# Weights end up in 16-bit for the GEMMs; f32 is for norms and for exact tests.
OUT_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32})
_MAX_GRID = 2**31 - 1  # CUDA grid.x limit
_MAX_ELEMENTS = 2**62  # int64 element/byte offsets stay far from overflow


class DequantError(EngineError):
    """The tensor's ggml type cannot be dequantized by this engine: the model cannot load."""

    code = ErrorCode.MODEL_LOAD_FAILED


def reject(kernel: str, arg: str, rule: str) -> KernelDimensionError:
    """The SPEC 4400 error: which kernel refused, which argument, which rule."""
    return KernelDimensionError(f"kernel {kernel}: argument {arg!r} violates: {rule}")


def check_type(ggml_type: GGMLType | int) -> GGMLType:
    """Known and supported, else DequantError: a model we cannot dequantize must not load."""
    try:
        t = GGMLType(ggml_type)
    except (ValueError, TypeError):
        raise DequantError(f"unknown ggml tensor type {ggml_type!r}") from None
    if t not in SUPPORTED_TYPES:
        names = ", ".join(sorted(s.name for s in SUPPORTED_TYPES))
        raise DequantError(f"ggml tensor type {t.name} is not supported by the dequantizer (supported: {names})")
    return t


def check_args(
    ggml_type: GGMLType,
    raw: torch.Tensor,
    n_elements: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
) -> int:
    """Validate everything the kernel's index arithmetic relies on; returns n_elements as int."""
    kernel = f"dequant_{ggml_type.name.lower()}"
    if not isinstance(raw, torch.Tensor):
        raise reject(kernel, "raw", f"must be a torch.Tensor, got {type(raw).__name__}")
    if raw.dtype != torch.uint8:
        raise reject(kernel, "raw", f"dtype must be torch.uint8, got {raw.dtype}")
    if raw.dim() != 1:
        raise reject(kernel, "raw", f"must be 1-D, got shape {tuple(raw.shape)}")
    if not raw.is_contiguous():
        raise reject(kernel, "raw", f"must be contiguous, got stride {raw.stride()}")
    if isinstance(n_elements, bool):
        raise reject(kernel, "n_elements", "must be an integer, got bool")
    try:
        n = operator.index(n_elements)
    except TypeError:
        raise reject(kernel, "n_elements", f"must be an integer, got {type(n_elements).__name__}") from None
    layout = BLOCK_LAYOUT[ggml_type]
    if not 0 < n <= _MAX_ELEMENTS:
        raise reject(kernel, "n_elements", f"must be in 1..2**62, got {n}")
    if n % layout.block_size:
        raise reject(kernel, "n_elements", f"must be a multiple of the block size {layout.block_size}, got {n}")
    expected = n // layout.block_size * layout.type_size
    if raw.numel() != expected:
        raise reject(
            kernel,
            "raw",
            f"byte length must be n_elements/{layout.block_size}*{layout.type_size} = {expected}, got {raw.numel()}",
        )
    programs = -(-(n // layout.block_size) // blocks_per_program(ggml_type))
    if programs > _MAX_GRID:
        raise reject(kernel, "n_elements", f"needs {programs} programs, more than the grid limit {_MAX_GRID}")
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in OUT_DTYPES:
        allowed = ", ".join(sorted(str(d) for d in OUT_DTYPES))
        raise reject(kernel, "out_dtype", f"must be one of {allowed}, got {out_dtype}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise reject(kernel, "out", f"must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != out_dtype:
            raise reject(kernel, "out", f"dtype must equal out_dtype {out_dtype}, got {out.dtype}")
        if out.device != raw.device:
            raise reject(kernel, "out", f"must be on raw's device {raw.device}, got {out.device}")
        if tuple(out.shape) != (n,):
            raise reject(kernel, "out", f"shape must be ({n},), got {tuple(out.shape)}")
        if not out.is_contiguous():
            raise reject(kernel, "out", f"must be contiguous, got stride {out.stride()}")
    return n
