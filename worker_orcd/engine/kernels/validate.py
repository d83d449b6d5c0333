"""Pre-launch checks shared by every kernel (SPEC 4400, KERNEL-SAFE).

A Triton kernel trusts its shapes, strides and int32 offsets completely; one
wrong dimension is an out-of-bounds read or write on the device. So every
public launcher calls these first, and each failure names the kernel, the
argument and the rule it broke, as a typed ``KernelDimensionError`` (shapes,
dtypes, devices, layout) or ``KernelParamError`` (scalar settings).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from typing import NoReturn

import torch

from ...errors import ErrorCode
from ..errors import EngineError, KernelDimensionError, KernelParamError

INT32_MAX = 2**31 - 1
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)

# Triton decides interpreter vs compiler when kernels are decorated, so this
# environment variable (set by tests/conftest.py before triton loads) is what
# allows CPU tensors through a Triton launch.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def fail(kernel: str, argument: str, rule: str) -> NoReturn:
    raise KernelDimensionError(
        f"kernel {kernel}: argument {argument!r} violates: {rule}", kernel=kernel, argument=argument, rule=rule
    )


def fail_param(kernel: str, argument: str, rule: str) -> NoReturn:
    raise KernelParamError(
        f"kernel {kernel}: parameter {argument!r} violates: {rule}", kernel=kernel, argument=argument, rule=rule
    )


def check(ok: bool, kernel: str, argument: str, rule: str) -> None:
    if not ok:
        fail(kernel, argument, rule)


def tensor(kernel: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(kernel, name, f"must be a torch.Tensor, got {type(t).__name__}")
    return t


def rank(kernel: str, name: str, t: torch.Tensor, expected: int) -> None:
    check(t.dim() == expected, kernel, name, f"must have rank {expected}, got shape {tuple(t.shape)}")


def dtype(kernel: str, name: str, t: torch.Tensor, allowed: Collection[torch.dtype]) -> None:
    check(t.dtype in allowed, kernel, name, f"dtype must be one of {sorted(map(str, allowed))}, got {t.dtype}")


def same_dtype(kernel: str, tensors: Mapping[str, torch.Tensor]) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        check(t.dtype == first.dtype, kernel, name, f"dtype must equal {first_name}'s {first.dtype}, got {t.dtype}")


def shape(kernel: str, name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    check(tuple(t.shape) == tuple(expected), kernel, name, f"shape must be {tuple(expected)}, got {tuple(t.shape)}")


def positive_dims(kernel: str, name: str, t: torch.Tensor) -> None:
    check(all(s > 0 for s in t.shape), kernel, name, f"every dimension must be > 0, got shape {tuple(t.shape)}")


def positive_int(kernel: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(kernel, name, f"must be a positive int, got {value!r}")
    return value


def finite_float(kernel: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail_param(kernel, name, f"must be a finite number, got {value!r}")
    return float(value)


def same_device(kernel: str, tensors: Mapping[str, torch.Tensor]) -> torch.device:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        check(t.device == first.device, kernel, name, f"must be on {first_name}'s device {first.device}, got {t.device}")
    check(first.device.type in ("cuda", "cpu"), kernel, first_name, f"device must be cuda (or cpu in dev/test mode), got {first.device}")
    if first.device.type == "cpu" and not TRITON_INTERPRETED:
        raise EngineError(
            f"kernel {kernel}: CPU tensors need TRITON_INTERPRET=1 set before triton is imported "
            "(the CPU dev mode uses the *_reference functions instead)"
        )
    return first.device


def unit_last_stride(kernel: str, name: str, t: torch.Tensor) -> None:
    check(t.stride(-1) == 1 or t.shape[-1] == 1, kernel, name, f"last dimension must be contiguous (stride 1), got strides {t.stride()}")


def contiguous(kernel: str, name: str, t: torch.Tensor) -> None:
    check(t.is_contiguous(), kernel, name, f"must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")


def int32_addressable(kernel: str, name: str, t: torch.Tensor) -> None:
    """The kernels index with int32: the furthest element offset must fit."""
    if t.numel() == 0:
        return
    reach = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    check(reach <= INT32_MAX and t.numel() <= INT32_MAX, kernel, name, f"element offsets must fit int32 (furthest offset {reach})")


def no_overlap(kernel: str, name: str, out: torch.Tensor, name_in: str, t_in: torch.Tensor) -> None:
    """``out`` must be ``t_in`` itself (in place) or not share its memory at all."""
    if out.data_ptr() == t_in.data_ptr() and out.shape == t_in.shape and out.stride() == t_in.stride():
        return
    a0, a1 = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
    b0, b1 = t_in.data_ptr(), t_in.data_ptr() + t_in.numel() * t_in.element_size()
    check(a1 <= b0 or b1 <= a0, kernel, name, f"must not partially overlap {name_in}")


def launch_error(kernel: str, device: torch.device, exc: BaseException) -> EngineError:
    """A failure raised by the launch itself crosses the boundary as a typed error (SPEC 4400)."""
    code = ErrorCode.CUDA_ERROR if device.type == "cuda" else ErrorCode.INTERNAL
    return EngineError(f"kernel {kernel}: launch failed: {type(exc).__name__}: {exc}", code=code)
