"""SPEC 5000: the determinism suite's streams on this GPU against a recording made on another.

``tests/fixtures/determinism_streams.json`` is written on a GPU machine by
``python benchmarks/determinism_streams.py record tests/fixtures/determinism_streams.json``
(GPU name, driver, CUDA/torch/Triton versions, commit, model digests, every
job's tokens). This test runs the same jobs here and reports every divergence
by job and token index. Same GPU model and software stack: the streams must be
identical. Another GPU generation or stack: divergence is reported as an
expected failure (SPEC 4713: see the determinism notes in docs/ARCHITECTURE.md),
identical streams pass. A model file with another digest always fails.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "determinism_streams.json"
STACK = ("gpu", "cuda", "torch", "triton")


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("determinism_streams", REPO / "benchmarks" / "determinism_streams.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_worker_5000_streams_match_the_recording_from_another_gpu(tmp_path: Path, device: str) -> None:
    assert FIXTURE.exists(), (
        f"no recording at {FIXTURE}: on a GPU machine run "
        "`python benchmarks/determinism_streams.py record tests/fixtures/determinism_streams.json` and commit it"
    )
    tool = _tool()
    recorded = json.loads(FIXTURE.read_text())
    now = tool.run_jobs(device, tmp_path, list(recorded["digests"]))
    diffs = tool.divergences(recorded, now)
    report = "\n".join([f"recorded: {recorded['env']}", f"here:     {now['env']}", *diffs])
    print(report)
    assert not [d for d in diffs if "model digest" in d or "only in" in d], report
    same_stack = all(recorded["env"].get(k) == now["env"].get(k) for k in STACK)
    if diffs and not same_stack:
        pytest.xfail(f"streams differ on another GPU/software stack (SPEC 4713):\n{report}")
    assert not diffs, report
