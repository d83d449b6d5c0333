"""Shared pieces of the kernel tests: dtype tolerances, relative error, seeded inputs (the `gen`
fixture with its fresh logged seed lives in conftest.py)."""

from __future__ import annotations

import torch

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
