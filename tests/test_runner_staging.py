"""The runner's host->device staging helpers (engine/runner.py): what reaches the device is what the
host wrote, for contiguous and strided destinations (the CUDA path stages strided ones through a
contiguous device buffer, so no copy reads pageable memory)."""

from __future__ import annotations

import torch

from worker_orcd.engine.runner import _rows, _upload


def test_upload_fills_strided_and_contiguous_views_row_major() -> None:
    host = torch.zeros((6, 10), dtype=torch.int32)
    stage = torch.full((60,), -7, dtype=torch.int32)
    dev = torch.full((6, 10), -1, dtype=torch.int32)
    rows = _rows(host, 3, 4)
    rows[:] = torch.arange(12, dtype=torch.int32).reshape(3, 4).numpy()
    _upload(dev[:3, :4], host, stage)
    assert torch.equal(dev[:3, :4], torch.arange(12, dtype=torch.int32).reshape(3, 4))
    assert int((dev[3:] != -1).sum()) == 0 and int((dev[:, 4:] != -1).sum()) == 0, "nothing outside the view"
    flat = torch.zeros(12, dtype=torch.int64)
    _rows(host.to(torch.int64), 1, 1)  # a view of the prefix, no copy: writes land in the tensor
    _rows(flat, 2, 6)[1, 5] = 42
    assert int(flat[11]) == 42
    whole = torch.zeros((3, 4), dtype=torch.int32)
    _upload(whole, host, stage)  # contiguous: copied directly
    assert torch.equal(whole, torch.arange(12, dtype=torch.int32).reshape(3, 4))


def test_decode_inputs_equal_the_row_by_row_layout() -> None:
    """The vectorised decode inputs (engine/runner.py) against the plain per-row formula, random rows."""
    import random

    import numpy as np

    from worker_orcd.batching.step import StepRow
    from worker_orcd.engine.paged_kv import SCRATCH_BLOCKS
    from worker_orcd.engine.runner import decode_inputs

    rng = random.Random(3)
    bs = 16
    for n, b in ((1, 1), (5, 8), (64, 64), (3, 96)):
        rows = []
        for i in range(n):
            start = rng.randrange(0, 2000)
            table = tuple(rng.sample(range(10_000), start // bs + 1))
            rows.append(StepRow(i, (rng.randrange(0, 151_936),), start, table, None))
        width = max(len(r.block_table) for r in rows)
        i64, bt = np.full((3, b), -5, dtype=np.int64), np.full((b, width), -5, dtype=np.int32)
        decode_inputs(rows, bs, i64, bt)
        want_i64, want_bt = np.zeros((3, b), dtype=np.int64), np.zeros((b, width), dtype=np.int32)
        for i, r in enumerate(rows):
            want_i64[:, i] = (r.tokens[0], r.start, (r.block_table[r.start // bs] + SCRATCH_BLOCKS) * bs + r.start % bs)
            want_bt[i, : len(r.block_table)] = np.asarray(r.block_table) + SCRATCH_BLOCKS
        assert (i64 == want_i64).all() and (bt == want_bt).all(), (n, b)
