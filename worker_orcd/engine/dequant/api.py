"""``dequantize``: validate, then run the Triton kernel (CUDA) or the torch reference (CPU).

Every launch is preceded by dimension validation (SPEC 4400, ``validate``)
and launch failures cross the boundary as ``EngineError`` with a stable code.
"""

from __future__ import annotations

import importlib
import os

import torch

from ...errors import ErrorCode
from ...gguf.constants import BLOCK_LAYOUT, GGMLType
from ..errors import EngineError
from .formats import ELEMENTS_PER_PROGRAM, FLOAT_TYPES, blocks_per_program
from .reference import dequantize_reference
from .validate import check_args, check_type

# Triton picks interpreter vs compiler when the kernels are decorated (import
# time), so this is what decides whether CPU tensors can go through Triton.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# (module, kernel): imported at the first launch, so the CPU mode runs without Triton (issue 10, defect 11).
_BLOCK_KERNELS: dict[GGMLType, tuple[str, str]] = {
    GGMLType.Q8_0: ("kernels_basic", "q8_0_kernel"),
    GGMLType.Q4_0: ("kernels_basic", "q4_0_kernel"),
    GGMLType.Q4_1: ("kernels_basic", "q4_1_kernel"),
    GGMLType.Q5_0: ("kernels_basic", "q5_0_kernel"),
    GGMLType.Q5_1: ("kernels_basic", "q5_1_kernel"),
    GGMLType.Q4_K: ("kernels_k", "q4_k_kernel"),
    GGMLType.Q5_K: ("kernels_k", "q5_k_kernel"),
    GGMLType.Q6_K: ("kernels_k", "q6_k_kernel"),
    GGMLType.Q2_K: ("kernels_k", "q2_k_kernel"),  # no fused matmul: used at load only
    GGMLType.Q3_K: ("kernels_k", "q3_k_kernel"),
}

# BF16 is handed to the kernel as int16 bits (see convert_kernel).
_FLOAT_SOURCE = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.int16}


def _launch(raw: torch.Tensor, ggml_type: GGMLType, n: int, out: torch.Tensor) -> None:
    """Launch the type's kernel; fp fusion off so results match ggml bit for bit."""
    import triton

    from . import kernels_basic as kb

    if ggml_type in FLOAT_TYPES:
        src_dtype = _FLOAT_SOURCE[ggml_type]
        if raw.storage_offset() % src_dtype.itemsize:
            raw = raw.clone()  # a typed view needs an aligned start; chunk slices may not have one
        grid = (triton.cdiv(n, ELEMENTS_PER_PROGRAM),)
        kb.convert_kernel[grid](
            raw.view(src_dtype),
            out,
            n,
            BLOCK=ELEMENTS_PER_PROGRAM,
            SRC_BF16=ggml_type == GGMLType.BF16,
            enable_fp_fusion=False,
        )
        return
    n_blocks = n // BLOCK_LAYOUT[ggml_type].block_size
    nb = blocks_per_program(ggml_type)
    grid = (triton.cdiv(n_blocks, nb),)
    module, name = _BLOCK_KERNELS[ggml_type]
    getattr(importlib.import_module(f".{module}", __package__), name)[grid](raw, out, n_blocks, NB=nb, enable_fp_fusion=False)


def dequantize(
    raw: torch.Tensor,
    ggml_type: GGMLType | int,
    n_elements: int,
    out_dtype: torch.dtype = torch.float16,
    *,
    out: torch.Tensor | None = None,
    force_triton: bool = False,
) -> torch.Tensor:
    """Dequantize GGUF block bytes ``raw`` into a 1-D tensor of ``n_elements`` (``out`` if given).

    ``out`` lets the loader stream a chunk of whole blocks straight into its
    slice of a preallocated weight. CUDA tensors use Triton; CPU tensors use
    the torch reference unless ``force_triton`` (Triton interpreter, tests).
    """
    t = check_type(ggml_type)
    n = check_args(t, raw, n_elements, out_dtype, out)
    kernel = f"dequant_{t.name.lower()}"
    device = raw.device.type
    if device not in ("cpu", "cuda"):
        raise EngineError(f"kernel {kernel}: device {raw.device} is neither cuda nor cpu (dev mode)")
    if device == "cpu" and not force_triton:
        result = dequantize_reference(raw, t, n, out_dtype)
        if out is None:
            return result
        out.copy_(result)
        return out
    if device == "cpu" and not TRITON_INTERPRETED:
        raise EngineError(f"kernel {kernel}: force_triton on CPU tensors needs TRITON_INTERPRET=1 before triton loads")
    if out is None:
        out = torch.empty(n, dtype=out_dtype, device=raw.device)
    try:
        _launch(raw, t, n, out)
    except Exception as exc:
        code = ErrorCode.CUDA_ERROR if device == "cuda" else ErrorCode.INTERNAL
        raise EngineError(f"kernel {kernel}: launch failed: {exc}", code=code) from exc
    return out
