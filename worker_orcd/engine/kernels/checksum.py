"""GPU fingerprint of the raw bytes of every weight buffer (the seal's residency check, SPEC 4121).

Definition (``checksum_reference`` is the executable spec). Buffer ``b`` is
read as little-endian uint32 words ``w_j`` (the last one zero-padded when
its byte count is not a multiple of 4). Each word becomes a 64-bit term

    x = fmix(w_j ^ (lo32(j) * GOLD + salt(b, hi32(j))))      (a bijection of w_j)
    term = x << 32 | fmix'(x)

and the digest is ``fmix64(sum of all terms + sum_b len_term(b, nbytes_b))``
mod 2^64. Because ``x`` is a bijection of the word and sits in the top half
of the term, changing any single byte changes exactly one term and hence
the sum; the salt makes the buffer index (order) and word position matter;
the length terms make trailing zero bytes matter. Random multi-word
corruption collides with probability ~2^-64. It is NOT collision-resistant
against an adversary who can write VRAM: terms are per word, so compensating
changes to a few words can be searched for in ~2^32 work. Defending against
that needs a cryptographic hash on the GPU (and costs bandwidth headroom).

Integer addition is associative, so the result never depends on how the
work is split; the reduction is still two fixed-order stages.

Speed: the whole model is one launch. ``ChecksumPlan`` precomputes a tile
table (tile address, word index, length, salt) once; each program streams
one 128 KiB tile with 16-byte vector loads (tile addresses are 16-byte
aligned and full tiles are unmasked), so the kernel reads at near-peak
bandwidth, then one program sums the per-tile partials in index order.
Buffers that are not 16-byte aligned and the sub-word tails go through a
byte-wise kernel (rare: torch allocations are 512-byte aligned).

Host side: ``checksum_reference`` states the definition plainly (64-bit terms
materialised); ``term_sum`` evaluates the same sum in uint32 lanes, chunk by
chunk, for the CPU mode's per-request seal check (``reference.checksum_cpu``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import validate as v

from .checksum_host import (  # noqa: F401 - re-exported: the host definition of the same checksum
    _M32,
    _M64,
    HOST_CHUNK_WORDS,
    _fmix32,
    _fmix64,
    length_constant,
    reference_term_sum,
    salt,
    term_sum,
)
# Measured on an H100 over 15.2 GB (benchmarks/tune_checksum.py): 2048 x 16 with 8 warps reads at
# 3176 GB/s, the plain-read ceiling (4.79 ms); the earlier 4096 x 8 split reached 2558 GB/s.
_WORD_BLOCK = 2048
_WORD_ITERS = 16
TILE_WORDS = _WORD_BLOCK * _WORD_ITERS  # a power of two: no tile crosses a 2^32-word boundary
_BYTE_TILE_WORDS = 1024
_REDUCE_BLOCK = 1024
_PLAN_CACHE_SIZE = 4
_plans: OrderedDict[tuple[object, ...], ChecksumPlan] = OrderedDict()


@triton.jit
def _term(w, j):
    """Per-word 64-bit term; ``w`` uint32 word, ``j`` uint32 (low word index mixed with the salt)."""
    x = w ^ j
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    x = x ^ (x >> 16)
    y = (x ^ (x >> 15)) * 0x2C1B3C6D
    y = y ^ (y >> 12)
    return (x.to(tl.uint64) << 32) | y.to(tl.uint64)


@triton.jit
def _word_tile(tab_ptr, part_ptr, tile, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    row = tab_ptr + tile * 4
    base = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.int32)), 16)
    j0 = tl.load(row + 1).to(tl.uint32)
    n_words = tl.load(row + 2).to(tl.int32)
    salt = tl.load(row + 3).to(tl.uint32)
    offs0 = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.uint64)
    if n_words == BLOCK * ITERS:
        for it in range(ITERS):
            k = it * BLOCK + offs0
            w = tl.load(base + k).to(tl.uint32, bitcast=True)
            acc += _term(w, (j0 + k.to(tl.uint32)) * 0x9E3779B1 + salt)
    else:
        for it in range(tl.cdiv(n_words, BLOCK)):
            k = it * BLOCK + offs0
            mask = k < n_words
            w = tl.load(base + k, mask=mask, other=0).to(tl.uint32, bitcast=True)
            t = _term(w, (j0 + k.to(tl.uint32)) * 0x9E3779B1 + salt)
            acc += tl.where(mask, t, tl.zeros_like(t))
    tl.store(part_ptr + tile, tl.sum(acc, axis=0).to(tl.int64, bitcast=True))


@triton.jit
def _words_kernel(tab_ptr, part_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    _word_tile(tab_ptr, part_ptr, tl.program_id(0), BLOCK, ITERS)


@triton.jit
def _words_strided_kernel(tab_ptr, part_ptr, n_tiles, programs, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """The same tiles' sums, ``programs`` programs taking every programs-th tile: a check that
    leaves most of the GPU to the steps it runs beside (the digest does not change)."""
    for tile in range(tl.program_id(0), n_tiles, programs):
        _word_tile(tab_ptr, part_ptr, tile, BLOCK, ITERS)


@triton.jit
def _bytes_kernel(tab_ptr, part_ptr, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    row = tab_ptr + tile * 5
    base = tl.load(row).to(tl.pointer_type(tl.uint8))
    j0 = tl.load(row + 1)
    n_words = tl.load(row + 2)
    n_bytes = tl.load(row + 3)
    salt = tl.load(row + 4).to(tl.uint32)
    k = tl.arange(0, BLOCK)
    j = j0 + k
    w = tl.zeros([BLOCK], dtype=tl.uint32)
    for b in tl.static_range(4):
        off = j * 4 + b
        byte = tl.load(base + off, mask=(k < n_words) & (off < n_bytes), other=0)
        w = w | (byte.to(tl.uint32) << (8 * b))
    t = _term(w, j.to(tl.uint32) * 0x9E3779B1 + salt)
    t = tl.where(k < n_words, t, tl.zeros_like(t))
    tl.store(part_ptr + tile, tl.sum(t, axis=0).to(tl.int64, bitcast=True))


@triton.jit
def _fmix64_dev(x):
    x = x ^ (x >> 33)
    x = x * 0xFF51AFD7ED558CCD
    x = x ^ (x >> 33)
    x = x * 0xC4CEB9FE1A85EC53
    return x ^ (x >> 33)


@triton.jit
def _finish_kernel(words_ptr, n_words_parts, bytes_ptr, n_bytes_parts, const_ptr, out_ptr, BLOCK: tl.constexpr):
    offs0 = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.uint64)
    for start in range(0, n_words_parts, BLOCK):
        offs = start + offs0
        acc += tl.load(words_ptr + offs, mask=offs < n_words_parts, other=0).to(tl.uint64, bitcast=True)
    for start in range(0, n_bytes_parts, BLOCK):
        offs = start + offs0
        acc += tl.load(bytes_ptr + offs, mask=offs < n_bytes_parts, other=0).to(tl.uint64, bitcast=True)
    total = tl.sum(acc, axis=0) + tl.load(const_ptr).to(tl.uint64, bitcast=True)
    tl.store(out_ptr, _fmix64_dev(total).to(tl.int64, bitcast=True))


# ---- host-side constants, shared with the reference --------------------------------------------


def _to_signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# ---- plan ---------------------------------------------------------------------------------------


def _check_buffers(kernel: str, buffers: object) -> tuple[list[torch.Tensor], torch.device]:
    """One tight loop (this runs before every request); messages are built only on failure."""
    if isinstance(buffers, torch.Tensor) or not isinstance(buffers, Sequence):
        v.fail(kernel, "buffers", f"must be a sequence of tensors, got {type(buffers).__name__}")
    v.check(len(buffers) > 0, kernel, "buffers", "must hold at least one tensor")
    first = v.tensor(kernel, "buffers[0]", buffers[0])
    device = first.device
    tensors = list(buffers)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.device != device or not t.is_contiguous():
            name = f"buffers[{i}]"
            v.tensor(kernel, name, t)
            v.contiguous(kernel, name, t)
            v.same_device(kernel, {"buffers[0]": first, name: t})
    v.same_device(kernel, {"buffers[0]": first})
    return tensors, device


class ChecksumPlan:
    """The tile tables for one fixed list of buffers; ``digest()`` is then three launches, no host work.

    The seal should build one plan over the resident weights and call
    ``digest()`` per request. The plan holds references to the buffers so
    the addresses it reads stay valid; ``checksum()``'s internal cache opts
    out (``keep_alive=False``) because its caller passes the live tensors in
    every call.
    """

    def __init__(self, buffers: Sequence[torch.Tensor], *, keep_alive: bool = True) -> None:
        kernel = "checksum"
        tensors, device = _check_buffers(kernel, buffers)
        self.device = device
        self._buffers: tuple[torch.Tensor, ...] = tuple(tensors) if keep_alive else ()
        word_rows: list[torch.Tensor] = []
        byte_rows: list[torch.Tensor] = []
        nbytes_all: list[int] = []
        for b, t in enumerate(tensors):
            addr = t.data_ptr()
            nbytes = t.numel() * t.element_size()
            nbytes_all.append(nbytes)
            if nbytes == 0:
                continue
            full_words = nbytes // 4
            total_words = (nbytes + 3) // 4
            if addr % 16 == 0:
                if full_words:
                    word_rows.append(self._word_tiles(b, addr, full_words))
                if total_words > full_words:  # the zero-padded tail word
                    byte_rows.append(self._byte_tiles(b, addr, nbytes, full_words, total_words))
            else:
                byte_rows.append(self._byte_tiles(b, addr, nbytes, 0, total_words))
        self.word_table = self._upload(word_rows, 4)
        self.byte_table = self._upload(byte_rows, 5)
        self.n_word_tiles = self.word_table.shape[0]
        self.n_byte_tiles = self.byte_table.shape[0]
        self.const = torch.tensor([_to_signed64(length_constant(nbytes_all))], dtype=torch.int64).to(device)
        self.n_bytes = sum(nbytes_all)

    @staticmethod
    def _word_tiles(b: int, addr: int, n_words: int) -> torch.Tensor:
        j0 = torch.arange(0, n_words, TILE_WORDS, dtype=torch.int64)
        rows = torch.empty((j0.numel(), 4), dtype=torch.int64)
        rows[:, 0] = addr + j0 * 4
        rows[:, 1] = j0 & _M32
        rows[:, 2] = torch.clamp(n_words - j0, max=TILE_WORDS)
        his = (j0 >> 32).tolist()
        rows[:, 3] = torch.tensor([salt(b, hi) for hi in his], dtype=torch.int64) if his[-1] else salt(b, 0)
        return rows

    @staticmethod
    def _byte_tiles(b: int, addr: int, nbytes: int, first_word: int, end_word: int) -> torch.Tensor:
        j0 = torch.arange(first_word, end_word, _BYTE_TILE_WORDS, dtype=torch.int64)
        rows = torch.empty((j0.numel(), 5), dtype=torch.int64)
        rows[:, 0] = addr
        rows[:, 1] = j0
        rows[:, 2] = torch.clamp(end_word - j0, max=_BYTE_TILE_WORDS)
        rows[:, 3] = nbytes
        rows[:, 4] = torch.tensor([salt(b, hi) for hi in (j0 >> 32).tolist()], dtype=torch.int64)
        return rows

    def _upload(self, rows: list[torch.Tensor], width: int) -> torch.Tensor:
        table = torch.cat(rows) if rows else torch.zeros((0, width), dtype=torch.int64)
        return table.to(self.device)

    def digest(self, programs: int | None = None) -> torch.Tensor:
        """int64 [1] on the device (the uint64 digest's bit pattern). ``programs``: at most that many
        programs read the word tiles (each a strided share; the same digest), so the check takes
        a bounded share of the GPU; None: one program per tile (the fastest alone)."""
        dev = self.device
        v.check(programs is None or programs >= 1, "checksum", "programs", f"must be >= 1, got {programs}")
        out = torch.empty(1, dtype=torch.int64, device=dev)
        part_w = torch.empty(max(1, self.n_word_tiles), dtype=torch.int64, device=dev)
        part_b = torch.empty(max(1, self.n_byte_tiles), dtype=torch.int64, device=dev)
        try:
            if self.n_word_tiles and programs is not None and programs < self.n_word_tiles:
                _words_strided_kernel[(programs,)](
                    self.word_table, part_w, self.n_word_tiles, programs, BLOCK=_WORD_BLOCK, ITERS=_WORD_ITERS, num_warps=8,
                )
            elif self.n_word_tiles:
                _words_kernel[(self.n_word_tiles,)](
                    self.word_table, part_w, BLOCK=_WORD_BLOCK, ITERS=_WORD_ITERS, num_warps=8,
                )
            if self.n_byte_tiles:
                _bytes_kernel[(self.n_byte_tiles,)](self.byte_table, part_b, BLOCK=_BYTE_TILE_WORDS, num_warps=4)
            _finish_kernel[(1,)](
                part_w, self.n_word_tiles, part_b, self.n_byte_tiles, self.const, out, BLOCK=_REDUCE_BLOCK, num_warps=4,
            )
        except Exception as exc:  # noqa: BLE001
            raise v.launch_error("checksum", dev, exc) from exc
        return out


def _plan_key(tensors: Sequence[torch.Tensor]) -> tuple[object, ...]:
    return (str(tensors[0].device),) + tuple((t.data_ptr(), t.nbytes) for t in tensors)


def checksum(buffers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Digest of the raw bytes of ``buffers`` (in order): int64 [1] on their device, no host sync.

    Plans are cached by (device, addresses, sizes), so the per-request call
    over the same resident weights costs only the launches.
    """
    tensors, _ = _check_buffers("checksum", buffers)
    key = _plan_key(tensors)
    plan = _plans.get(key)
    if plan is None:
        plan = ChecksumPlan(tensors, keep_alive=False)
        _plans[key] = plan
        while len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan.digest()


def digest_hex(digest: torch.Tensor) -> str:
    """16 lowercase hex digits of a digest tensor (one 8-byte device-to-host copy)."""
    return f"{int(digest.reshape(-1)[0].item()) & _M64:016x}"


def checksum_hex(buffers: Sequence[torch.Tensor]) -> str:
    return digest_hex(checksum(buffers))


# ---- reference ----------------------------------------------------------------------------------

def checksum_reference(buffers: Sequence[torch.Tensor]) -> int:
    """The digest as a Python int in [0, 2^64), computed on the host from the definition above."""
    total = 0
    nbytes_all = []
    for b, t in enumerate(buffers):
        raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        nbytes_all.append(raw.size)
        padded = np.zeros((raw.size + 3) // 4 * 4, dtype=np.uint8)
        padded[: raw.size] = raw
        total += reference_term_sum(padded.view("<u4"), 0, b)
    return _fmix64((total + length_constant(nbytes_all)) & _M64)
