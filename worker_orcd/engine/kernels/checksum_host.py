"""The checksum's host half: its definition in integers and numpy, without Triton.

Split from checksum.py (issue 10, defect 11) so that the CPU mode's seal, which
evaluates these before every request, imports without Triton; checksum.py's
kernels compute the same terms on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _fmix32(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _fmix64(x: int) -> int:
    x &= _M64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M64
    return x ^ (x >> 33)


def salt(buffer_index: int, word_hi: int) -> int:
    """Per (buffer, 2^32-word segment) salt: makes buffer order and word position part of every term."""
    return _fmix32(buffer_index * 0x27D4EB2F + word_hi * 0x165667B1 + 0x3C6EF372)


def length_constant(nbytes: Sequence[int]) -> int:
    """Sum of per-buffer length terms plus the buffer count, mod 2^64."""
    total = _fmix64(len(nbytes) ^ 0xD6E8FEB86659FD93)
    for b, n in enumerate(nbytes):
        total += _fmix64((((b + 1) * 0x9E3779B97F4A7C15) & _M64) ^ n)
    return total & _M64


# The kernels' literals, named for the host evaluators below (``_term`` / the tile loop above).
_INDEX_GOLD = 0x9E3779B1
_X_MUL1, _X_MUL2, _Y_MUL = 0x85EBCA6B, 0xC2B2AE35, 0x2C1B3C6D
# term_sum's chunk: 512 KiB uint32 scratch arrays stay cache-resident, and each numpy call is long
# enough that threads do not queue on the GIL between calls (2^16 words was GIL-bound with 2 threads)
HOST_CHUNK_WORDS = 1 << 17
_INDEX_MIX = np.arange(HOST_CHUNK_WORDS, dtype=np.uint32) * np.uint32(_INDEX_GOLD)  # k * GOLD mod 2^32


def _np_fmix_terms(w: np.ndarray, j: np.ndarray) -> np.ndarray:
    u32 = np.uint32
    x = w ^ j
    x = x * u32(_X_MUL1)
    x = x ^ (x >> u32(13))
    x = x * u32(_X_MUL2)
    x = x ^ (x >> u32(16))
    y = (x ^ (x >> u32(15))) * u32(_Y_MUL)
    y = y ^ (y >> u32(12))
    return (x.astype(np.uint64) << np.uint64(32)) | y.astype(np.uint64)


def term_sum(w: np.ndarray, first_word: int, buffer_index: int, x: np.ndarray, t: np.ndarray) -> int:
    """Sum mod 2^64 of the terms of words ``w`` (buffer ``buffer_index``, global indices from ``first_word``).

    The fast host evaluation of the definition (the CPU mode's seal runs it before every request):
    sum(x << 32 | y) = (sum x) << 32 + sum y, so every step stays in uint32 lanes, in place in the
    caller's scratch ``x``/``t`` (uint32, >= len(w)), and the 64-bit terms are never materialised.
    ``w`` must not cross a 2^32-word boundary (one salt per chunk).
    """
    n = w.size
    if n == 0:
        return 0
    if n > HOST_CHUNK_WORDS or first_word >> 32 != (first_word + n - 1) >> 32:
        raise ValueError(f"term_sum: {n} words from {first_word} exceed one chunk or cross a 2^32-word boundary")
    u32 = np.uint32
    x, t = x[:n], t[:n]
    mix0 = ((first_word & _M32) * _INDEX_GOLD + salt(buffer_index, first_word >> 32)) & _M32
    np.add(_INDEX_MIX[:n], u32(mix0), out=x)  # (j & M32) * GOLD + salt, j = first_word + k
    np.bitwise_xor(x, w, out=x)
    np.multiply(x, u32(_X_MUL1), out=x)
    np.right_shift(x, u32(13), out=t)
    np.bitwise_xor(x, t, out=x)
    np.multiply(x, u32(_X_MUL2), out=x)
    np.right_shift(x, u32(16), out=t)
    np.bitwise_xor(x, t, out=x)
    sum_x = int(np.add.reduce(x, dtype=u32))  # only sum x mod 2^32 reaches the upper word
    np.right_shift(x, u32(15), out=t)
    np.bitwise_xor(x, t, out=t)
    np.multiply(t, u32(_Y_MUL), out=t)
    np.right_shift(t, u32(12), out=x)
    np.bitwise_xor(t, x, out=t)  # t = y
    sum_y = int(np.add.reduce(t, dtype=np.uint64))  # exact: n < 2^32 terms below 2^32
    return ((sum_x << 32) + sum_y) & _M64


def reference_term_sum(w: np.ndarray, first_word: int, buffer_index: int) -> int:
    """Sum mod 2^64 of the terms of uint32 words ``w`` at global word indices ``first_word``.., as defined."""
    if w.size == 0:
        return 0
    j = np.arange(first_word, first_word + w.size, dtype=np.uint64)
    hi = (j >> np.uint64(32)).astype(np.int64)
    salts = np.array([salt(buffer_index, h) for h in range(int(hi[0]), int(hi[-1]) + 1)], dtype=np.uint32)
    mixed = (j & np.uint64(_M32)).astype(np.uint32) * np.uint32(_INDEX_GOLD) + salts[hi - hi[0]]
    return int(np.sum(_np_fmix_terms(w.astype(np.uint32), mixed), dtype=np.uint64))
