"""qlayout: the quantized residency's one repacking (Q8_0/Q6_K/Q4_0/Q4_1/Q5_0/Q5_1 fields into planes) is an exact,
size-preserving permutation of the file's bytes, and a row lookup through it gives the file's rows."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.engine.qlayout import PLANAR_TYPES, from_planes, plane_rows, repack_planar, to_planes
from worker_orcd.engine.qweight import QWeight
from worker_orcd.gguf.constants import BLOCK_LAYOUT, GGMLType


def _raw(t: GGMLType, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    nbytes = n * k // BLOCK_LAYOUT[t].block_size * BLOCK_LAYOUT[t].type_size
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


FIRST_PLANE = {GGMLType.Q8_0: (2, 32), GGMLType.Q6_K: (0, 128), GGMLType.Q4_0: (2, 16), GGMLType.Q4_1: (4, 16),
               GGMLType.Q5_0: (6, 16), GGMLType.Q5_1: (8, 16)}  # (offset in the block, bytes)


@pytest.mark.parametrize("t", sorted(PLANAR_TYPES), ids=lambda t: t.name)
def test_worker_4100_planes_round_trip(t: GGMLType) -> None:
    n, k = 7, 512
    raw = _raw(t, n, k, 1)
    p = to_planes(raw, t, n, k)
    assert p.numel() == raw.numel() and not torch.equal(p, raw)
    assert torch.equal(from_planes(p, t, n, k), raw)
    # row n's first plane (the quants: Q8_0 qs, Q6_K ql, Q4_0/Q4_1/Q5_0/Q5_1 qs) is contiguous at n * (its bytes per row)
    off, width = FIRST_PLANE[t]
    per_row = k // BLOCK_LAYOUT[t].block_size * width
    blocks = raw.view(n, k // BLOCK_LAYOUT[t].block_size, BLOCK_LAYOUT[t].type_size)
    first = blocks[3, :, off : off + width]
    assert torch.equal(p[3 * per_row : 4 * per_row], first.reshape(-1))
    idx = torch.tensor([6, 0, 3, 3])
    want = raw.view(n, -1)[idx].reshape(-1)
    assert torch.equal(plane_rows(p, t, n, k, idx), want)
    assert torch.equal(QWeight(p, t, n, k, planar=True).rows(idx), want)
    assert torch.equal(QWeight(p, t, n, k, planar=True).gguf_bytes(), raw)
    slot = raw.clone()
    repack_planar(slot, t, n, k)
    assert torch.equal(slot, p)


def test_worker_4400_planes_reject_bad_input() -> None:
    raw = _raw(GGMLType.Q8_0, 4, 64, 2)
    with pytest.raises(ValueError, match="expected"):
        to_planes(raw[:-2], GGMLType.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        to_planes(raw, GGMLType.Q8_0, 4, 48)
    with pytest.raises(ValueError, match="no planar layout"):
        to_planes(_raw(GGMLType.Q4_K, 1, 256, 3), GGMLType.Q4_K, 1, 256)
    with pytest.raises(ValueError):
        from_planes(raw.view(torch.int8), GGMLType.Q8_0, 4, 64)
