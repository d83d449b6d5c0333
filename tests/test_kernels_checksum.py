"""GPU weight fingerprint used by the seal (SPEC 4121): definition, sensitivity, order, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from worker_orcd.engine import reference
from worker_orcd.engine.errors import KernelDimensionError
from worker_orcd.engine.kernels.checksum import (
    HOST_CHUNK_WORDS,
    TILE_WORDS,
    ChecksumPlan,
    checksum,
    checksum_hex,
    checksum_reference,
    digest_hex,
    reference_term_sum,
    term_sum,
)
from worker_orcd.engine.reference import checksum_cpu




def random_bytes(gen: torch.Generator, n: int, device: str) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).to(device)


def model_like(gen: torch.Generator, device: str) -> list[torch.Tensor]:
    """Mixed dtypes, sizes with 1-3 byte tails, a multi-tile buffer, a misaligned view and an empty one."""
    backing = random_bytes(gen, 4096, device)
    return [
        torch.randn(3 * TILE_WORDS + 123, generator=gen).to(device),  # 3 full tiles + a partial one
        torch.randn(37, generator=gen).to(device=device, dtype=torch.float16),  # 74 bytes: 2-byte tail
        torch.randn(5, 7, generator=gen).to(device=device, dtype=torch.bfloat16),
        random_bytes(gen, 1001, device),  # 1-byte tail
        random_bytes(gen, 3, device),  # tail only
        backing[5:2000],  # not 16-byte aligned: the byte-wise path
        torch.empty(0, device=device),
    ]


def test_worker_4121_checksum_matches_the_reference_definition(gen: torch.Generator, device: str) -> None:
    buffers = model_like(gen, device)
    digest = checksum(buffers)
    assert digest.dtype == torch.int64 and digest.shape == (1,) and digest.device == buffers[0].device
    assert digest_hex(digest) == f"{checksum_reference(buffers):016x}"
    assert len(checksum_hex(buffers)) == 16


def test_worker_4121_any_single_byte_flip_changes_the_digest(gen: torch.Generator, device: str) -> None:
    """Random positions in every buffer, plus first/last bytes and every tail byte."""
    buffers = model_like(gen, device)
    base = checksum_hex(buffers)
    raw = [b.view(torch.uint8).reshape(-1) for b in buffers]
    targets: list[tuple[int, int]] = []
    for i, r in enumerate(raw):
        n = r.numel()
        if n == 0:
            continue
        picks = {0, n - 1, *range(n - n % 4, n)}
        picks |= set(torch.randint(0, n, (3,), generator=gen).tolist())
        targets += [(i, p) for p in sorted(picks)]
    for i, pos in targets:
        bit = 1 << int(torch.randint(0, 8, (1,), generator=gen))
        raw[i][pos] ^= bit
        flipped = checksum_hex(buffers)
        raw[i][pos] ^= bit
        assert flipped != base, f"flip of bit {bit} at byte {pos} of buffer {i} went unnoticed"
    assert checksum_hex(buffers) == base


def test_worker_4121_same_bytes_same_digest_wherever_they_live(gen: torch.Generator, device: str) -> None:
    buffers = model_like(gen, device)
    copies = [b.clone() for b in buffers]  # new addresses, same content
    assert checksum_hex(buffers) == checksum_hex(buffers) == checksum_hex(copies)
    assert digest_hex(ChecksumPlan(copies).digest()) == checksum_hex(buffers)


def test_worker_4121_buffer_order_and_boundaries_matter(gen: torch.Generator, device: str) -> None:
    a = random_bytes(gen, 4000, device)
    b = random_bytes(gen, 4000, device)
    assert checksum_hex([a, b]) != checksum_hex([b, a])
    joined = torch.cat([a, b])
    assert checksum_hex([joined]) != checksum_hex([a, b])
    assert checksum_hex([joined[:4004], joined[4004:].clone()]) != checksum_hex([a, b])
    assert checksum_hex([a, torch.zeros(0, dtype=torch.uint8, device=device)]) != checksum_hex([a])
    zeros = torch.zeros(64, dtype=torch.uint8, device=device)
    assert checksum_hex([zeros]) != checksum_hex([zeros[:60].clone()])  # trailing zero bytes count


def test_worker_4711_checksum_deterministic_and_plan_cached(gen: torch.Generator, device: str) -> None:
    buffers = model_like(gen, device)
    first = checksum(buffers)
    second = checksum(buffers)
    assert torch.equal(first, second)
    plan = ChecksumPlan(buffers)
    assert torch.equal(plan.digest(), plan.digest())
    assert plan.n_bytes == sum(b.numel() * b.element_size() for b in buffers)


def test_worker_4121_strided_digest_is_the_same_digest(gen: torch.Generator, device: str) -> None:
    """A seal check run in a bounded number of programs (beside the engine's steps) computes the
    same digest for every program count, including counts that do not divide the tiles; a flip
    is seen by each; zero programs is refused."""
    buffers = model_like(gen, device)
    buffers.insert(0, torch.randint(-(2**31), 2**31 - 1, (5 * TILE_WORDS + 77,), generator=gen, dtype=torch.int32).to(device))
    plan = ChecksumPlan(buffers)
    want = digest_hex(plan.digest())
    assert want == f"{checksum_reference(buffers):016x}"
    assert plan.n_word_tiles >= 8
    for programs in (1, 2, 3, plan.n_word_tiles - 1, plan.n_word_tiles, plan.n_word_tiles + 5):
        assert digest_hex(plan.digest(programs)) == want, programs
    buffers[0].view(torch.uint8)[4 * TILE_WORDS * 3 + 5] ^= 0x01  # in the fourth tile
    assert digest_hex(plan.digest(3)) != want
    assert digest_hex(plan.digest(3)) == digest_hex(plan.digest())
    with pytest.raises(KernelDimensionError):
        plan.digest(0)


def test_worker_4400_checksum_rejects_bad_input(device: str) -> None:
    good = torch.randn(8, device=device)
    cases = [
        (lambda: checksum([]), "buffers"),
        (lambda: checksum(good), "buffers"),  # type: ignore[arg-type]
        (lambda: checksum([good, b"bytes"]), "buffers[1]"),  # type: ignore[list-item]
        (lambda: checksum([torch.randn(4, 4, device=device).t()]), "buffers[0]"),
        (lambda: checksum([good, torch.randn(8, device="meta")]), "buffers[1]"),
    ]
    for call, arg in cases:
        with pytest.raises(KernelDimensionError) as info:
            call()
        assert info.value.kernel == "checksum" and info.value.argument == arg, str(info.value)


@pytest.mark.gpu
def test_worker_4121_checksum_large_gpu_matches_reference(gen: torch.Generator, device: str) -> None:
    """A 600 MiB mix on the GPU agrees with the CPU mode's host evaluation (itself held to the
    definition below), and a flip in the middle is seen by both."""
    buffers = [torch.randint(-(2**31), 2**31 - 1, (50 * 2**20,), dtype=torch.int32, device=device) for _ in range(3)]
    buffers += model_like(gen, device)
    assert checksum_hex(buffers) == f"{checksum_cpu(buffers):016x}"
    base = checksum_hex(buffers)
    buffers[1].view(torch.uint8)[123_456_789] ^= 0x10
    assert checksum_hex(buffers) != base
    assert checksum_hex(buffers) == f"{checksum_cpu(buffers):016x}"


# --- the host evaluation (CPU mode's per-request seal check) ---------------------------------------


def test_worker_4121_host_checksum_is_the_definition(
    gen: torch.Generator, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``checksum_cpu`` == the executable definition == the kernel, for any thread count and with
    chunk and thread-span seams everywhere (tiny chunks/spans), and it sees single-bit flips."""
    buffers = model_like(gen, device)
    want = checksum_reference(buffers)
    assert digest_hex(checksum(buffers)) == f"{want:016x}"
    for threads in (1, 2, 3):
        assert checksum_cpu(buffers, threads=threads) == want
    monkeypatch.setattr(reference, "_CHECKSUM_CHUNK_WORDS", 1000)
    monkeypatch.setattr(reference, "_CHECKSUM_SPAN_WORDS", 7 * 1000 + 13)
    assert checksum_cpu(buffers, threads=2) == want
    raw = buffers[0].view(torch.uint8).reshape(-1)
    for pos in (0, 4 * 1000 - 1, 4 * 1000, 4 * (7 * 1000 + 13), raw.numel() - 1):
        raw[pos] ^= 0x04
        flipped = checksum_cpu(buffers, threads=2)
        assert flipped != want and flipped == checksum_reference(buffers), pos
        raw[pos] ^= 0x04
    assert checksum_cpu(buffers) == want


@pytest.mark.parametrize("first_word", [0, 2**32 - 1000, 2**32, 5 * 2**32 - 70_001])
def test_worker_4121_host_checksum_salt_segments(gen: torch.Generator, first_word: int) -> None:
    """Word indices past 2^32 (a >16 GiB buffer) change the salt: a span that crosses the boundary
    is cut there, and each chunk's sum equals the definition's (exact 64-bit terms)."""
    words = torch.randint(-(2**31), 2**31 - 1, (150_000,), generator=gen, dtype=torch.int32).numpy().view(np.uint32)
    assert reference._span_sum(words, 3, first_word) == reference_term_sum(words, first_word, 3)
    x = np.empty(HOST_CHUNK_WORDS, dtype=np.uint32)
    t = np.empty(HOST_CHUNK_WORDS, dtype=np.uint32)
    full = np.full(HOST_CHUNK_WORDS, 0xFFFFFFFF, dtype=np.uint32)  # one whole chunk
    start = first_word & -HOST_CHUNK_WORDS
    assert term_sum(full, start, 1, x, t) == reference_term_sum(full, start, 1)
    with pytest.raises(ValueError):
        term_sum(words[:10], 2**32 - 5, 0, x, t)  # crosses a salt boundary
    with pytest.raises(ValueError):
        term_sum(words[: HOST_CHUNK_WORDS + 1], 0, 0, np.empty(HOST_CHUNK_WORDS + 1, np.uint32), t)


def test_worker_4400_host_checksum_rejects_bad_input() -> None:
    good = torch.randn(8)
    cases = [
        (lambda: checksum_cpu([]), "buffers"),
        (lambda: checksum_cpu(good), "buffers"),  # type: ignore[arg-type]
        (lambda: checksum_cpu([good, b"bytes"]), "buffers[1]"),  # type: ignore[list-item]
        (lambda: checksum_cpu([torch.randn(4, 4).t()]), "buffers[0]"),
        (lambda: checksum_cpu([good, torch.randn(8, device="meta")]), "buffers[1]"),
        (lambda: checksum_cpu([torch.randn(8, device="meta")]), "buffers[0]"),
    ]
    for call, arg in cases:
        with pytest.raises(KernelDimensionError) as info:
            call()
        assert info.value.kernel == "checksum" and info.value.argument == arg, str(info.value)


def test_worker_4121_host_checksum_is_cheap() -> None:
    """CPU mode runs it before every request over every weight byte: ~3 GB/s per core here (the
    plain numpy definition manages ~0.3 GB/s). Loose floor, best of three, so only a real
    regression fails; the rate is printed."""
    buf = torch.randint(-(2**31), 2**31 - 1, (16 * 2**20,), dtype=torch.int32)  # 64 MiB
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        checksum_cpu([buf])
        best = min(best, time.perf_counter() - t0)
    rate = buf.numel() * 4 / best / 1e9
    print(f"host checksum: {rate:.2f} GB/s")
    assert rate > 1.0, f"host checksum ran at {rate:.2f} GB/s"


@pytest.mark.gpu
def test_worker_4121_checksum_reads_near_peak_bandwidth(device: str) -> None:
    """The seal runs this before every request: a 15 GB model must verify in ~5 ms on an H100.

    Loose floor (1.5 TB/s) so only a real regression fails; the measured rate is printed.
    """
    from worker_orcd.engine.kernels import bench_kernels

    results = bench_kernels(device)
    print(results)
    assert results["checksum_GBps"] > 1500.0, results
    assert all(value > 0 for value in results.values())
