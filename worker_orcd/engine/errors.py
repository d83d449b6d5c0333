"""Typed errors of the GPU layer; they cross the boundary as WorkerError codes (SPEC 4400)."""

from __future__ import annotations

from ..errors import ErrorCode, WorkerError


class EngineError(WorkerError):
    """Any failure inside the GPU layer that is not more specifically typed."""


class KernelDimensionError(EngineError):
    """A kernel launch was refused because an argument broke a dimension rule (KERNEL-SAFE).

    ``kernel``/``argument``/``rule`` are optional structured copies of what the
    message says, so callers and tests can branch on them without parsing text.
    """

    def __init__(self, message: str, *, kernel: str = "", argument: str = "", rule: str = "") -> None:
        super().__init__(message)
        self.kernel = kernel
        self.argument = argument
        self.rule = rule


class KernelParamError(EngineError):
    """A scalar kernel parameter (e.g. a sampling setting) is outside its documented range.

    The host validates requests first; reaching this means a caller skipped that,
    and the message names the parameter and the rule like any INVALID_PARAMS.
    """

    code = ErrorCode.INVALID_PARAMS

    def __init__(self, message: str, *, kernel: str = "", argument: str = "", rule: str = "") -> None:
        super().__init__(message)
        self.kernel = kernel
        self.argument = argument
        self.rule = rule
