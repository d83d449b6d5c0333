"""Typed errors of the GPU layer; they cross the boundary as WorkerError codes (SPEC 4400)."""

from __future__ import annotations

from ..errors import WorkerError


class EngineError(WorkerError):
    """Any failure inside the GPU layer that is not more specifically typed."""


class KernelDimensionError(EngineError):
    """A kernel launch was refused because an argument broke a dimension rule (KERNEL-SAFE)."""
