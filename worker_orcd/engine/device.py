"""The process's one compute device, opened with deterministic settings (SPEC 4400, 4711).

CUDA is the product. ``kind="cpu"`` is the explicit development/test mode
("GPU only" in the SPEC): the same engine code runs on CPU tensors in
float32, it is announced loudly, and it never claims VRAM residency.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ErrorCode, WorkerError

log = logging.getLogger("worker_orcd.engine")

DeviceKind = Literal["cuda", "cpu"]
# cuBLAS picks reduction strategies per workspace; a fixed workspace config is what makes
# its GEMMs bitwise reproducible (cuBLAS docs, "Results reproducibility").
_CUBLAS_WORKSPACE = ":4096:8"
_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")
NO_CUDA_MESSAGE = "no CUDA device visible; use --device cpu only for development/testing"
DEV_MODE_BANNER = (
    "DEVELOPMENT MODE: running the engine on the CPU. Nothing is resident in VRAM, "
    "performance is not representative; never use this mode in production."
)

_lock = threading.Lock()
_opened: tuple[DeviceKind, int] | None = None


def _configure_cublas_env() -> None:
    """Must run before the first cuBLAS handle exists (i.e. before any CUDA GEMM)."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _DETERMINISTIC_WORKSPACES:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = _CUBLAS_WORKSPACE


def _set_deterministic_torch() -> None:
    import torch

    torch.use_deterministic_algorithms(True)
    # Every buffer we allocate is fully written before it is read; filling fresh
    # allocations with NaN would only add kernels (also inside captured graphs).
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # fp16/bf16 GEMMs accumulate in fp32 without reduced-precision split-K reductions.
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


@dataclass(frozen=True)
class DeviceContext:
    kind: DeviceKind
    index: int
    name: str
    total_bytes: int

    @property
    def dev_mode(self) -> bool:
        """True in the CPU development/test mode: nothing here is VRAM-resident."""
        return self.kind == "cpu"

    @property
    def torch_device(self) -> Any:
        import torch

        return torch.device("cuda", self.index) if self.kind == "cuda" else torch.device("cpu")

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory; on the CPU, available/total host RAM."""
        if self.kind == "cuda":
            import torch

            try:
                free, total = torch.cuda.mem_get_info(self.index)
            except RuntimeError as e:
                raise WorkerError(
                    f"cudaMemGetInfo failed on device {self.index}: {e}", code=ErrorCode.CUDA_ERROR
                ) from None
            return int(free), int(total)
        return _host_memory()

    def bind_thread(self) -> None:
        """Make this device current in the calling thread: torch guards its own ops, but Triton
        launches and graph replays use the thread's current device, which is 0 in a new thread."""
        if self.kind == "cuda":
            import torch

            torch.cuda.set_device(self.index)

    def synchronize(self) -> None:
        if self.kind == "cuda":
            import torch

            torch.cuda.synchronize(self.index)

    def describe(self) -> dict[str, Any]:
        """For /health and /worker/ready: what the worker computes on, never pointers."""
        free, total = self.mem_get_info()
        d: dict[str, Any] = {
            "kind": self.kind,
            "gpu_device": self.index,
            "name": self.name,
            "dev_mode": self.dev_mode,
            "vram_resident": not self.dev_mode,
            "free_bytes": free,
            "total_bytes": total,
        }
        if self.dev_mode:
            d["warning"] = DEV_MODE_BANNER
        return d


def _host_memory() -> tuple[int, int]:
    free = total = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    free = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if total == 0:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        total = free = pages * size
    return free, total


def open_device(kind: DeviceKind = "cuda", gpu_device: int = 0) -> DeviceContext:
    """Open the process's one device; a second, different device is refused (SPEC 4020, 4400)."""
    global _opened
    if kind not in ("cuda", "cpu"):
        raise WorkerError(f"device must be 'cuda' or 'cpu', got {kind!r}", code=ErrorCode.INVALID_PARAMS)
    if isinstance(gpu_device, bool) or not isinstance(gpu_device, int) or gpu_device < 0:
        raise WorkerError(
            f"gpu_device must be a non-negative integer, got {gpu_device!r}", code=ErrorCode.INVALID_PARAMS
        )
    with _lock:
        if kind == "cuda":
            _require_cuda(gpu_device)  # a missing GPU is reported as such, whatever else happened
        if _opened is not None and _opened != (kind, gpu_device):
            raise WorkerError(
                f"this process already uses device {_opened[0]}:{_opened[1]}; one device per process (SPEC 4020)",
                code=ErrorCode.CUDA_ERROR,
            )
        ctx = _open_cuda(gpu_device) if kind == "cuda" else _open_cpu()
        _opened = (kind, gpu_device)
        return ctx


def _open_cpu() -> DeviceContext:
    _set_deterministic_torch()
    log.warning(DEV_MODE_BANNER)
    _, total = _host_memory()
    return DeviceContext(kind="cpu", index=0, name="cpu (development mode)", total_bytes=total)


def _require_cuda(index: int) -> None:
    _configure_cublas_env()
    import torch

    try:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    except RuntimeError as e:  # driver present but broken
        raise WorkerError(f"{NO_CUDA_MESSAGE} (CUDA initialisation failed: {e})", code=ErrorCode.CUDA_ERROR) from None
    if not available or count == 0:
        raise WorkerError(NO_CUDA_MESSAGE, code=ErrorCode.CUDA_ERROR)
    if index >= count:
        raise WorkerError(
            f"gpu_device {index} does not exist: {count} CUDA device(s) visible", code=ErrorCode.CUDA_ERROR
        )


def _open_cuda(index: int) -> DeviceContext:
    import torch

    _set_deterministic_torch()
    try:
        torch.cuda.set_device(index)
        torch.cuda.init()
        props = torch.cuda.get_device_properties(index)
        _, total = torch.cuda.mem_get_info(index)
    except RuntimeError as e:
        raise WorkerError(f"cannot open CUDA device {index}: {e}", code=ErrorCode.CUDA_ERROR) from None
    return DeviceContext(kind="cuda", index=index, name=str(props.name), total_bytes=int(total))


def _reset_for_tests() -> None:
    """Forget the opened device (tests open cpu and simulate cuda in one process)."""
    global _opened
    with _lock:
        _opened = None


_HOST_OOM_HINTS = ("can't allocate memory", "not enough memory", "cannot allocate memory")


def _translate(exc: BaseException, what: str, index: int) -> WorkerError:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return WorkerError(
            f"{what}: GPU {index} ran out of memory ({str(exc).splitlines()[0]})", code=ErrorCode.VRAM_OOM
        )
    if isinstance(exc, MemoryError):
        return WorkerError(f"{what}: host memory exhausted", code=ErrorCode.HOST_OOM)
    text = str(exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, RuntimeError) and any(h in text.lower() for h in _HOST_OOM_HINTS):
        return WorkerError(f"{what}: host memory exhausted ({first})", code=ErrorCode.HOST_OOM)
    if isinstance(exc, RuntimeError) and ("CUDA" in text or "cuda" in text or "CUBLAS" in text):
        return WorkerError(f"{what}: CUDA error on GPU {index}: {first}", code=ErrorCode.CUDA_ERROR)
    return WorkerError(f"{what}: internal error ({type(exc).__name__}: {first})", code=ErrorCode.INTERNAL)


@contextlib.contextmanager
def device_errors(what: str, index: int = 0) -> Iterator[None]:
    """Turn torch/CUDA exceptions into coded WorkerErrors at the GPU boundary (SPEC 4400, 4952)."""
    try:
        yield
    except WorkerError:
        raise
    except Exception as exc:  # noqa: BLE001 - every other exception is translated, never leaked
        raise _translate(exc, what, index) from exc
