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
