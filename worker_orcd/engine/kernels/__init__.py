"""Triton kernels of the engine (SPEC 4700-4713): one file per kernel, each validated before launch.

On CUDA tensors these launch compiled Triton; on CPU tensors they run only
under ``TRITON_INTERPRET=1`` (how CI tests them). The engine's CPU dev mode
uses torch code instead; each module also ships a ``*_reference`` that the
tests hold the kernels to.

Remaining sources of non-determinism (SPEC 4713): none inside these kernels
for identical inputs on the same GPU model and Triton version: fixed tile
orders, fixed-order reductions, no floating-point atomics (the batched
sampler counts token ids with integer atomics, which commute),
counter-based RNG. Results can differ across GPU architectures or Triton
versions (different tile configs or instruction selection change fp
rounding), and the CPU interpreter
rounds fp32 -> bf16 by truncation where the GPU rounds to nearest-even.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .attention import attention_decode, attention_prefill, attention_reference, decode_split_size
    from .checksum import ChecksumPlan, checksum, checksum_hex, checksum_reference, digest_hex
    from .attention_paged import paged_attention
    from .matmul_dense import dense_matmul
    from .qmatmul import qlinear
    from .rmsnorm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
    from .rope import rope_, rope_reference, rope_store_
    from .sampling import filtered_probs_reference, sample, sample_draws
    from .sampling_batched import sample_batch, sample_batch_stages

# Each name's module is imported at its first use (PEP 562): importing this package, or a
# Triton-free submodule such as ``validate`` or ``checksum_host``, never loads Triton, so the
# CPU mode runs without it (issue 10, defect 11).
_HOME = {
    "attention": ("attention_decode", "attention_prefill", "attention_reference", "decode_split_size"),
    "checksum": ("ChecksumPlan", "checksum", "checksum_hex", "checksum_reference", "digest_hex"),
    "attention_paged": ("paged_attention",),
    "matmul_dense": ("dense_matmul",),
    "qmatmul": ("qlinear",),
    "rmsnorm": ("add_rms_norm", "add_rms_norm_reference", "rms_norm", "rms_norm_reference"),
    "rope": ("rope_", "rope_reference", "rope_store_"),
    "sampling": ("filtered_probs_reference", "sample", "sample_draws"),
    "sampling_batched": ("sample_batch", "sample_batch_stages"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ChecksumPlan",
    "add_rms_norm",
    "add_rms_norm_reference",
    "attention_decode",
    "attention_prefill",
    "attention_reference",
    "bench_kernels",
    "checksum",
    "checksum_hex",
    "checksum_reference",
    "decode_split_size",
    "dense_matmul",
    "digest_hex",
    "paged_attention",
    "qlinear",
    "filtered_probs_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_",
    "rope_reference",
    "rope_store_",
    "sample",
    "sample_batch",
    "sample_batch_stages",
    "sample_draws",
]


def _time_us(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Mean of ``iters`` back-to-back runs after one warm-up, in microseconds."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000.0 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e6 / iters


def bench_kernels(device: str | torch.device) -> dict[str, float]:
    """Throughput/latency of the hot kernels on ``device`` (reported, not asserted).

    CUDA: a 4 GiB checksum over 130 buffers (model-like mix of sizes), and
    Qwen2.5-1.5B-shaped decode attention (Hq=12, Hk=2, D=128, bf16) at
    several sequence lengths in a 32k cache. CPU (interpreter): tiny sizes,
    only to exercise the code path.
    """
    from .attention import attention_decode
    from .checksum import ChecksumPlan
    from .sampling import sample

    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    cuda = dev.type == "cuda"
    results: dict[str, float] = {}

    n_big, big_elems = (128, 8 * 2**20) if cuda else (2, 4096)  # 128 x 32 MiB fp32
    buffers = [torch.rand(big_elems, device=dev) for _ in range(n_big)]
    buffers += [torch.randn(1536, device=dev), torch.randint(0, 255, (1001,), dtype=torch.uint8, device=dev)]
    plan = ChecksumPlan(buffers)
    us = _time_us(plan.digest, dev, 20 if cuda else 2)
    results["checksum_bytes"] = float(plan.n_bytes)
    results["checksum_us"] = us
    results["checksum_GBps"] = plan.n_bytes / (us * 1e-6) / 1e9
    del buffers, plan

    dtype = torch.bfloat16 if cuda else torch.float32
    hq, hk, d = 12, 2, 128
    s_max = 32768 if cuda else 256
    k_cache = torch.randn((s_max, hk, d), generator=gen).to(device=dev, dtype=dtype)
    v_cache = torch.randn((s_max, hk, d), generator=gen).to(device=dev, dtype=dtype)
    q = torch.randn((hq, d), generator=gen).to(device=dev, dtype=dtype)
    out = torch.empty((hq, d), dtype=dtype, device=dev)
    for n in ((512, 2048, 8192, 32768) if cuda else (64, 256)):
        seq_len = torch.tensor([n], dtype=torch.int32, device=dev)
        results[f"decode_us_seq{n}"] = _time_us(
            lambda s=seq_len: attention_decode(q, k_cache, v_cache, s, d**-0.5, out=out), dev, 50 if cuda else 2
        )
    del k_cache, v_cache

    vocab = 151936 if cuda else 4096
    logits = torch.randn(vocab, generator=gen).to(dev)
    results["sample_topk_topp_us"] = _time_us(
        lambda: sample(logits, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                       penalty_ids=None, seed=1, step=0), dev, 50 if cuda else 2,
    )
    results["sample_topp_fullsort_us"] = _time_us(
        lambda: sample(logits, temperature=0.7, top_k=0, top_p=0.9, min_p=0.0, repetition_penalty=1.0,
                       penalty_ids=None, seed=1, step=0), dev, 50 if cuda else 2,
    )
    return results
