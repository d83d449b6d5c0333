"""Micro-benchmark: raw-byte throughput of ``dequantize`` per ggml type.

Loading is bounded by reading the file; this tells whether on-device dequant
could ever be the bottleneck. Random bytes are fine here: NaN/Inf scales do
not change the kernels' speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ...gguf.constants import BLOCK_LAYOUT, GGMLType
from .api import dequantize
from .formats import SUPPORTED_TYPES


def _time_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median wall time of ``fn()`` in ms (CUDA events on GPU so the launch is not what we time)."""
    samples: list[float] = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def bench_dequant(
    device: str | torch.device,
    *,
    raw_mib: int | None = None,
    out_dtype: torch.dtype = torch.float16,
    iters: int = 10,
    types: frozenset[GGMLType] = SUPPORTED_TYPES,
) -> dict[str, dict[str, float]]:
    """Per type: ``raw_bytes``, ``ms`` (median), ``raw_gbps`` read and ``total_gbps`` read+written.

    ``raw_mib`` defaults to 256 MiB on CUDA and 4 MiB elsewhere (CPU dev mode
    runs the torch reference; keep it small on shared machines).
    """
    dev = torch.device(device)
    budget = (raw_mib if raw_mib is not None else (256 if dev.type == "cuda" else 4)) * 2**20
    gen = torch.Generator(device=dev).manual_seed(0)
    results: dict[str, dict[str, float]] = {}
    for t in sorted(types):
        layout = BLOCK_LAYOUT[t]
        n_blocks = max(1, budget // layout.type_size)
        n = n_blocks * layout.block_size
        raw = torch.randint(0, 256, (n_blocks * layout.type_size,), dtype=torch.uint8, device=dev, generator=gen)
        out = torch.empty(n, dtype=out_dtype, device=dev)
        def run() -> torch.Tensor:
            return dequantize(raw, t, n, out_dtype, out=out)

        run()  # compile / warm up
        ms = _time_ms(run, dev, iters)
        written = n * out.element_size()
        results[t.name] = {
            "raw_bytes": float(raw.numel()),
            "ms": ms,
            "raw_gbps": raw.numel() / ms / 1e6,
            "total_gbps": (raw.numel() + written) / ms / 1e6,
        }
        del raw, out
    return results
