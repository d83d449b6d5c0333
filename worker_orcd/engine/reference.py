"""CPU implementations of the kernel library's exact definitions, for the development mode.

``sample_reference`` draws what ``kernels.sample`` draws (same penalty,
cut-offs and Philox-4x32-10 Gumbel noise keyed by seed and step), and
``checksum_cpu`` computes ``kernels.checksum``'s digest (fast, multi-threaded:
it is the CPU mode's per-request seal check), so sampling streams and seals
mean the same thing in both modes. Tests hold them to the kernels (run by the
Triton interpreter) and to the definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import KernelParamError
from .kernels import validate as v
from .kernels.checksum_host import HOST_CHUNK_WORDS, _fmix64, length_constant, term_sum

_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_SAMPLE_TAG = 0x534D504C  # the sampling kernel's stream tag ("SMPL")
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def philox_x0(seed: int, c0: np.ndarray, c1: int, c2: int, c3: int) -> np.ndarray:
    """First output word of Philox-4x32-10 (Triton's ``tl.philox``) for counters (c0[i], c1, c2, c3)."""
    k0, k1 = np.uint64(seed & _M32), np.uint64(seed >> 32)
    x0 = c0.astype(np.uint64)
    x1, x2, x3 = (np.full_like(x0, c) for c in (c1, c2, c3))
    a, b, m = np.uint64(_PHILOX_ROUND_A), np.uint64(_PHILOX_ROUND_B), np.uint64(_M32)
    for _ in range(10):
        pb, pa = b * x2, a * x0  # 32 x 32 -> 64 bits: exact in uint64
        x0, x2, x1, x3 = (pb >> np.uint64(32)) ^ x1 ^ k0, (pa >> np.uint64(32)) ^ x3 ^ k1, pb & m, pa & m
        k0, k1 = (k0 + np.uint64(_PHILOX_KEY_A)) & m, (k1 + np.uint64(_PHILOX_KEY_B)) & m
    return x0.astype(np.uint32)


def sample_reference(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    penalty_ids: torch.Tensor | None,
    seed: int,
    step: int,
) -> torch.Tensor:
    """The sampling kernel's scheme in plain torch/numpy (CPU mode): penalty, temperature,
    top-k/top-p/min-p cut-off, then Gumbel-max with Philox noise keyed by (seed, token, step)."""
    if not 0.0 <= temperature <= 2.0:
        raise KernelParamError(f"kernel sample: parameter 'temperature' violates: must be in [0, 2], got {temperature}")
    greedy = temperature == 0.0
    t_div = 1.0 if greedy else float(temperature)
    raw = logits.detach().float().reshape(-1)
    V = raw.numel()
    work = raw / t_div
    if penalty_ids is not None and penalty_ids.numel() and repetition_penalty != 1.0:
        ids = penalty_ids.reshape(-1).to(torch.int64)
        ids = ids[(ids >= 0) & (ids < V)]
        picked = raw[ids]
        work[ids] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty) / t_div
    keep = torch.ones(V, dtype=torch.bool)
    if not greedy and (0 < top_k < V or top_p < 1.0 or min_p > 0.0):
        vals = torch.sort(work, descending=True).values
        if 0 < top_k < V:
            vals = vals[:top_k]
        thr = float("-inf")
        if 0 < top_k < V:
            thr = float(vals[-1])
        if top_p < 1.0:
            p = torch.exp(vals - vals[0])
            before = torch.cumsum(p, 0) - p
            kept = max(1, int((before < top_p * p.sum()).sum()))
            thr = max(thr, float(vals[kept - 1]))
        if min_p > 0.0:
            thr = max(thr, float(vals[0]) + math.log(min_p))
        keep = work >= thr
    score = work.numpy().astype(np.float32)
    if not greedy:
        r = philox_x0(seed, np.arange(V, dtype=np.uint32), step & _M32, step >> 32, _SAMPLE_TAG)
        # the kernel's 23 bits: (k + 0.5) / 2^23 is exact in fp32, strictly inside (0, 1) (24 bits
        # rounded the top value to 1.0, whose Gumbel noise is +inf)
        u = ((r >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 8388608.0)
        score = score - np.log(-np.log(u))
    score = np.where(keep.numpy(), score, np.float32(-np.inf))
    return torch.tensor([int(np.argmax(score))], dtype=torch.int64, device=logits.device)


_CHECKSUM_CHUNK_WORDS = HOST_CHUNK_WORDS
_CHECKSUM_SPAN_WORDS = 1 << 24  # one thread-pool task (64 MiB): small enough to balance a busy machine
_CHECKSUM_MAX_THREADS = 8  # past this the host's memory bandwidth, not the ALUs, is the limit


def _span_sum(words: np.ndarray, b: int, first_word: int) -> int:
    """Terms of ``words`` (buffer ``b``, global indices from ``first_word``), one cache-sized chunk at a
    time; numpy releases the GIL inside each ufunc, so spans run in parallel."""
    chunk = _CHECKSUM_CHUNK_WORDS
    x = np.empty(chunk, dtype=np.uint32)
    t = np.empty(chunk, dtype=np.uint32)
    total = 0
    pos, stop = 0, words.size
    while pos < stop:
        j = first_word + pos
        end = min(stop, pos + chunk, (((j >> 32) + 1) << 32) - first_word)  # one salt per chunk
        total += term_sum(words[pos:end], j, b, x, t)
        pos = end
    return total & _M64


def _spans(n_words: int) -> list[tuple[int, int]]:
    step = _CHECKSUM_SPAN_WORDS
    return [(s, min(n_words, s + step)) for s in range(0, n_words, step)]


def _host_buffers(buffers: object) -> list[torch.Tensor]:
    """The kernel's input rules (typed ``KernelDimensionError``), minus its device rule: any
    CPU or CUDA tensor can be read from the host."""
    kernel = "checksum"
    if isinstance(buffers, torch.Tensor) or not isinstance(buffers, Sequence):
        v.fail(kernel, "buffers", f"must be a sequence of tensors, got {type(buffers).__name__}")
    v.check(len(buffers) > 0, kernel, "buffers", "must hold at least one tensor")
    first = v.tensor(kernel, "buffers[0]", buffers[0])
    for i, t in enumerate(buffers):
        name = f"buffers[{i}]"
        v.tensor(kernel, name, t)
        v.contiguous(kernel, name, t)
        v.check(t.device == first.device, kernel, name, f"must be on buffers[0]'s device {first.device}, got {t.device}")
        v.check(t.device.type in ("cpu", "cuda"), kernel, name, f"must hold readable memory, got device {t.device}")
    return list(buffers)


def checksum_cpu(buffers: Sequence[torch.Tensor], threads: int | None = None) -> int:
    """``kernels.checksum``'s digest on the host, fast enough to run before every CPU-mode request.

    Same validation (typed errors) as the kernel; spans of whole words go to a thread pool (numpy
    ufuncs release the GIL), each evaluated by ``kernels.checksum.term_sum`` in cache-sized chunks;
    the 1-3 byte tail word of a buffer is zero-padded here. ~3 GB/s per core.
    """
    tensors = _host_buffers(buffers)
    raws = [t.detach().cpu().reshape(-1).view(torch.uint8).numpy() for t in tensors]
    jobs: list[tuple[np.ndarray, int, int]] = []
    total = 0
    x = np.empty(1, dtype=np.uint32)
    t = np.empty(1, dtype=np.uint32)
    for b, raw in enumerate(raws):
        full = raw.size // 4
        words = raw[: full * 4].view("<u4")
        jobs += [(words[start:stop], b, start) for start, stop in _spans(full)]
        if raw.size % 4:
            tail = np.zeros(4, dtype=np.uint8)
            tail[: raw.size % 4] = raw[full * 4 :]
            total += term_sum(tail.view("<u4"), full, b, x, t)
    n = max(1, min(_CHECKSUM_MAX_THREADS, torch.get_num_threads() if threads is None else threads, len(jobs)))
    if n == 1:
        total += sum(_span_sum(*job) for job in jobs)
    else:
        with ThreadPoolExecutor(n, thread_name_prefix="checksum") as pool:
            total += sum(pool.map(lambda job: _span_sum(*job), jobs))
    return _fmix64((total + length_constant([raw.size for raw in raws])) & _M64)
