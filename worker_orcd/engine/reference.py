"""CPU implementations of the kernel library's exact definitions, for the development mode.

``sample_reference`` draws what ``kernels.sample`` draws (same penalty,
cut-offs and Philox-4x32-10 Gumbel noise keyed by seed and step), and
``checksum_cpu`` computes ``kernels.checksum``'s digest in bounded chunks, so
sampling streams and seals mean the same thing in both modes. Tests hold
them to the kernels (run by the Triton interpreter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .errors import KernelParamError
from .kernels.checksum import _fmix64, _np_fmix_terms, length_constant, salt

_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_SAMPLE_TAG = 0x534D504C  # the sampling kernel's stream tag ("SMPL")
_M32 = 0xFFFFFFFF


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
        u = ((r >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 16777216.0)
        score = score - np.log(-np.log(u))
    score = np.where(keep.numpy(), score, np.float32(-np.inf))
    return torch.tensor([int(np.argmax(score))], dtype=torch.int64, device=logits.device)


_CHECKSUM_CHUNK_WORDS = 1 << 22


def checksum_cpu(buffers: Sequence[torch.Tensor]) -> int:
    """``kernels.checksum.checksum_reference`` evaluated chunk by chunk (memory stays ~100 MB)."""
    total = 0
    sizes: list[int] = []
    for b, t in enumerate(buffers):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        sizes.append(raw.size)
        n_words = (raw.size + 3) // 4
        full = raw.size // 4
        words = raw[: full * 4].view("<u4")
        for start in range(0, n_words, _CHECKSUM_CHUNK_WORDS):
            stop = min(n_words, start + _CHECKSUM_CHUNK_WORDS)
            if stop <= full:
                w = words[start:stop].astype(np.uint32)
            else:  # the zero-padded tail word
                tail = np.zeros((stop - start) * 4, dtype=np.uint8)
                chunk = raw[start * 4 :]
                tail[: chunk.size] = chunk
                w = tail.view("<u4").astype(np.uint32)
            j = np.arange(start, stop, dtype=np.uint64)
            hi = (j >> np.uint64(32)).astype(np.int64)
            salts = np.array([salt(b, int(h)) for h in range(int(hi[0]), int(hi[-1]) + 1)], dtype=np.uint32)
            mixed = (j & np.uint64(0xFFFFFFFF)).astype(np.uint32) * np.uint32(0x9E3779B1) + salts[hi - hi[0]]
            total = (total + int(np.sum(_np_fmix_terms(w, mixed), dtype=np.uint64))) & 0xFFFFFFFFFFFFFFFF
    return _fmix64((total + length_constant(sizes)) & 0xFFFFFFFFFFFFFFFF)
