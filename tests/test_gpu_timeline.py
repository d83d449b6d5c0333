"""benchmarks/gpu_timeline.py: busy/idle time and per-kernel shares from a chrome trace (the numbers a
step-overhead diagnosis reads), on a hand-built trace whose answers are known."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_timeline  # noqa: E402


def _ev(cat: str, name: str, ts: float, dur: float) -> dict[str, object]:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_summary_splits_busy_idle_and_ranks_kernels() -> None:
    trace = {"traceEvents": [
        _ev("kernel", "gemv", 0, 100), _ev("kernel", "gemv", 50, 100),  # overlapping: busy 0..150
        _ev("gpu_memcpy", "Memcpy HtoD", 160, 10),  # 10 us idle before it (not a > 20 us gap)
        _ev("kernel", "argmax", 300, 50),  # 130 us idle before it
        _ev("cuda_runtime", "cudaEventSynchronize", 0, 400),
        _ev("cuda_runtime", "cudaGraphLaunch", 0, 5),
        _ev("cpu_op", "aten::mm", 0, 1000),  # host-side: ignored
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 5},  # not a complete event: ignored
    ]}
    s = gpu_timeline.summary(trace, steps=2)
    assert s["window_ms"] == pytest.approx(0.35)
    assert s["busy_ms_per_step"] == pytest.approx((150 + 10 + 50) / 1e3 / 2)
    assert s["idle_ms_per_step"] == pytest.approx((10 + 130) / 1e3 / 2)
    assert s["idle_gaps_over_20us_per_step"] == pytest.approx(0.5)
    assert s["idle_in_gaps_over_20us_ms_per_step"] == pytest.approx(0.065)
    assert s["graph_launches_per_step"] == pytest.approx(0.5)
    assert s["host_wait_ms_per_step"] == {"cudaEventSynchronize": pytest.approx(0.2)}
    assert s["top"][0] == ("gemv", pytest.approx(0.1), pytest.approx(1.0))
    assert [name for name, _, _ in s["top"]] == ["gemv", "argmax", "Memcpy HtoD"]


def test_summary_without_device_activity() -> None:
    assert gpu_timeline.summary({"traceEvents": [_ev("cpu_op", "x", 0, 1)]}, steps=3) == {"steps": 3, "kernels": 0}
    assert gpu_timeline.summary({"traceEvents": [_ev("kernel", "k", 0, 1)]}, steps=0)["kernels"] == 0
