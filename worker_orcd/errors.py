"""One error model for the whole worker (SPEC 4950-4952).

Every failure that crosses a module boundary is a ``WorkerError`` carrying a
stable ``code``; HTTP bodies and SSE ``error`` events are rendered from it, so
the same code always means the same thing with the same status and retry hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """Stable error codes (SPEC 4950). Extend, never rename."""

    INVALID_PARAMS = "INVALID_PARAMS"
    AUTH_FAILED = "AUTH_FAILED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    CAPABILITY_MISMATCH = "CAPABILITY_MISMATCH"
    SEAL_VERIFICATION_FAILED = "SEAL_VERIFICATION_FAILED"
    INSUFFICIENT_VRAM = "INSUFFICIENT_VRAM"
    VRAM_OOM = "VRAM_OOM"
    HOST_OOM = "HOST_OOM"
    CUDA_ERROR = "CUDA_ERROR"
    INFERENCE_TIMEOUT = "INFERENCE_TIMEOUT"
    CANCELLED = "CANCELLED"
    WORKER_BUSY = "WORKER_BUSY"
    WORKER_NOT_READY = "WORKER_NOT_READY"
    INTERNAL = "INTERNAL"
    TP_GROUP_FAILED = "TP_GROUP_FAILED"


@dataclass(frozen=True)
class CodeInfo:
    http_status: int
    retriable: bool
    retry_after_ms: int | None
    meaning: str


# The README's error table is generated from / checked against this mapping.
CODE_INFO: dict[ErrorCode, CodeInfo] = {
    ErrorCode.INVALID_PARAMS: CodeInfo(400, False, None, "request failed validation; the message names the field"),
    ErrorCode.AUTH_FAILED: CodeInfo(401, False, None, "missing or wrong bearer token"),
    ErrorCode.FORBIDDEN: CodeInfo(403, False, None, "the job belongs to another caller"),
    ErrorCode.NOT_FOUND: CodeInfo(404, False, None, "no such job or handle"),
    ErrorCode.MODEL_LOAD_FAILED: CodeInfo(422, False, None, "model file refused: path, digest, signature or GGUF structure"),
    ErrorCode.CAPABILITY_MISMATCH: CodeInfo(422, False, None, "model needs a feature this engine does not run (MCD not within ECP)"),
    ErrorCode.SEAL_VERIFICATION_FAILED: CodeInfo(500, False, None, "resident weights or seal no longer match; worker stops"),
    ErrorCode.INSUFFICIENT_VRAM: CodeInfo(507, False, None, "model + KV cache + scratch do not fit in free VRAM"),
    ErrorCode.VRAM_OOM: CodeInfo(503, True, 1000, "device allocation failed during a request"),
    ErrorCode.HOST_OOM: CodeInfo(503, True, 1000, "host allocation failed, or no disk space to stage a streamed commit"),
    ErrorCode.CUDA_ERROR: CodeInfo(500, False, None, "CUDA/driver error; worker stops"),
    ErrorCode.INFERENCE_TIMEOUT: CodeInfo(504, True, 0, "job exceeded the inference timeout"),
    ErrorCode.CANCELLED: CodeInfo(409, False, None, "job cancelled by its owner or by client disconnect"),
    ErrorCode.WORKER_BUSY: CodeInfo(503, True, 250, "the batch and its wait queue are full (with --max-batch 1: the one slot is taken); retry later"),
    ErrorCode.WORKER_NOT_READY: CodeInfo(503, True, 1000, "no sealed model yet, or draining"),
    ErrorCode.INTERNAL: CodeInfo(500, False, None, "unexpected failure; details only in the log"),
    ErrorCode.TP_GROUP_FAILED: CodeInfo(500, False, None, "a tensor-parallel peer failed, hung, left or was refused; worker stops"),
}


class WorkerError(Exception):
    """Base of every error the worker reports; renders to the SPEC 4951 shape."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retriable: bool | None = None,
        retry_after_ms: int | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        info = CODE_INFO[self.code]
        self.message = message
        # For the operator's log only, never rendered to a caller: resolved paths, the model
        # root, bytes of a file, OS errors (issue 10, defect 9). The message stays generic.
        self.detail = detail
        self.retriable = info.retriable if retriable is None else retriable
        self.retry_after_ms = info.retry_after_ms if retry_after_ms is None else retry_after_ms

    @property
    def http_status(self) -> int:
        return CODE_INFO[self.code].http_status

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code.value,
            "message": self.message,
            "retriable": self.retriable,
            "retry_after_ms": self.retry_after_ms,
        }

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class ModelLoadError(WorkerError):
    """The model file was refused before anything reached the GPU."""

    code = ErrorCode.MODEL_LOAD_FAILED


class CapabilityError(WorkerError):
    """The model's MCD is not within the engine's ECP (SPEC 4620-4623)."""

    code = ErrorCode.CAPABILITY_MISMATCH


class InvalidParams(WorkerError):
    code = ErrorCode.INVALID_PARAMS


class SealVerificationError(WorkerError):
    """Resident weights or the seal no longer match what was sealed (SPEC 4122)."""

    code = ErrorCode.SEAL_VERIFICATION_FAILED
