"""VRAM-only attestation (SPEC 4100-4101): ask the CUDA runtime, not torch, where each buffer lives.

``tensor.is_cuda`` only says which allocator torch used; managed (unified)
memory and mapped pinned host memory are both addressable from kernels too.
``cudaPointerGetAttributes`` reports the memory type of the allocation, so
every weight, KV-cache and scratch buffer must come back as
``cudaMemoryTypeDevice`` on our device with no host mapping. Reports carry
counts and bytes, never pointers (4111).
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .device import DeviceContext
from .errors import EngineError

# enum cudaMemoryType (driver_types.h)
MEMORY_TYPES = {0: "unregistered", 1: "host", 2: "device", 3: "managed"}
_DEVICE = 2
CPU_STATUS = "not resident (CPU development mode)"


class _CudaPointerAttributes(ctypes.Structure):
    # CUDA >= 11 layout; the trailing reserve absorbs fields newer runtimes may append.
    _fields_ = [
        ("type", ctypes.c_int),
        ("device", ctypes.c_int),
        ("devicePointer", ctypes.c_void_p),
        ("hostPointer", ctypes.c_void_p),
        ("_reserved", ctypes.c_long * 16),
    ]


PointerQuery = Callable[[int], tuple[int, int, bool]]  # ptr -> (memory type, device, has host pointer)


def _bindings_query() -> PointerQuery | None:
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        return None

    def query(ptr: int) -> tuple[int, int, bool]:
        err, attrs = cudart.cudaPointerGetAttributes(ptr)
        if int(err) != 0:
            raise EngineError(f"cudaPointerGetAttributes failed with cudaError {int(err)}")
        return int(attrs.type), int(attrs.device), bool(int(attrs.hostPointer or 0))

    return query


def _libcudart_candidates() -> list[str]:
    """The runtime torch already loaded first (same library instance), then torch's bundled copy."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                path = line.rsplit(maxsplit=1)[-1]
                if "libcudart" in os.path.basename(path) and path not in found:
                    found.append(path)
    except OSError:
        pass
    torch_dir = os.path.dirname(torch.__file__)
    for pattern in (
        "../nvidia/cuda_runtime/lib/libcudart.so*",
        "../nvidia/cu*/lib/libcudart.so*",
        "lib/libcudart*.so*",
    ):
        found += sorted(glob.glob(os.path.join(torch_dir, pattern)))
    return found + ["libcudart.so"]


def _ctypes_query() -> PointerQuery | None:
    lib = None
    for path in _libcudart_candidates():
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError:
            continue
    if lib is None:
        return None
    fn = lib.cudaPointerGetAttributes
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_CudaPointerAttributes), ctypes.c_void_p]

    def query(ptr: int) -> tuple[int, int, bool]:
        attrs = _CudaPointerAttributes()
        err = fn(ctypes.byref(attrs), ctypes.c_void_p(ptr))
        if err != 0:
            raise EngineError(f"cudaPointerGetAttributes failed with cudaError {err}")
        return attrs.type, attrs.device, bool(attrs.hostPointer)

    return query


_query: PointerQuery | None = None
_method = ""


def _pointer_query() -> tuple[PointerQuery, str]:
    global _query, _method
    if _query is None:
        q = _bindings_query()
        _method = "cuda.bindings.runtime.cudaPointerGetAttributes"
        if q is None:
            q = _ctypes_query()
            _method = "cudaPointerGetAttributes (libcudart via ctypes)"
        if q is None:
            raise EngineError("cannot attest VRAM residency: neither cuda.bindings nor libcudart is loadable")
        _query = q
    return _query, _method


def _storages(tensors: Sequence[torch.Tensor]) -> dict[int, tuple[int, str]]:
    """Distinct allocations (storage start -> (bytes, device type)); views share their base's storage."""
    out: dict[int, tuple[int, str]] = {}
    for t in tensors:
        st = t.untyped_storage()
        out[st.data_ptr()] = (st.nbytes(), t.device.type)
    return out


def attest_buffers(ctx: DeviceContext, groups: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, Any]:
    """Check every buffer of every group; raise EngineError on anything not plain VRAM of ``ctx``."""
    if ctx.dev_mode:
        return {
            "resident": False,
            "status": CPU_STATUS,
            "dev_mode": True,
            "groups": {
                name: {"buffers": len(_storages(ts)), "bytes": sum(n for n, _ in _storages(ts).values())}
                for name, ts in groups.items()
            },
        }
    query, method = _pointer_query()
    report: dict[str, Any] = {
        "resident": True,
        "status": "resident in VRAM",
        "dev_mode": False,
        "gpu_device": ctx.index,
        "method": method,
        "groups": {},
    }
    for name, tensors in groups.items():
        storages = _storages(tensors)
        for start, (nbytes, dev_type) in storages.items():
            if dev_type != "cuda":
                raise EngineError(f"{name}: a buffer of {nbytes} bytes is on {dev_type}, not on the GPU (SPEC 4100)")
            for ptr in (start, start + max(nbytes, 1) - 1):  # both ends of the allocation
                mem_type, device, mapped = query(ptr)
                if mem_type != _DEVICE or mapped:
                    kind = MEMORY_TYPES.get(mem_type, f"type {mem_type}")
                    raise EngineError(
                        f"{name}: a buffer of {nbytes} bytes is {kind}{' host-mapped' if mapped else ''} memory, "
                        "not device memory (SPEC 4101)"
                    )
                if device != ctx.index:
                    raise EngineError(
                        f"{name}: a buffer of {nbytes} bytes lives on GPU {device}, not on GPU {ctx.index}"
                    )
        report["groups"][name] = {
            "buffers": len(storages),
            "bytes": sum(n for n, _ in storages.values()),
            "memory_type": "device",
        }
    return report
