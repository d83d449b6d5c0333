"""Steps with prompt chunks replay graphs captured per (tokens, rows) bucket (engine/runner.py).

The padding that fills a bucket must be inert: the runner's padded inputs, run through the real
kernels, give the sampled rows bit-identical logits to the unpadded eager step. On the CPU the
kernels run in Triton's interpreter with test_qmatmul's row-wise dot model (what the tensor core
guarantees per element); the ``gpu`` test in test_engine_batching checks compiled graphs end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from synthetic import synth as _synth
from test_qmatmul import rowwise_dot  # noqa: F401 - fixture
from worker_orcd.batching.step import SampleSpec, StepBatch, StepRow
from worker_orcd.engine import ops
from worker_orcd.engine.config import model_config
from worker_orcd.engine.device import DeviceContext
from worker_orcd.engine.events import SamplingParams
from worker_orcd.engine.kernels import validate
from worker_orcd.engine.model import Model
from worker_orcd.engine.paged_kv import PagedKVCache
from worker_orcd.engine.runner import ModelRunner
from worker_orcd.engine.upload import upload
from worker_orcd.engine.weights import bind, weight_layout
from worker_orcd.gguf.reader import parse_file
from worker_orcd.integrity import sha256_path

synth = _synth()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    path = synth.write_synthetic_model(tmp_path_factory.mktemp("mixed") / "tiny.gguf", "tiny-qwen2", "F16")
    g = parse_file(path)
    cfg = model_config(g)
    lay = weight_layout(cfg, g, torch.float32)
    arena = torch.empty(lay.total_bytes, dtype=torch.uint8)
    with open(path, "rb") as fh:
        upload(fh, g, lay, arena, sha256_path(path), DeviceContext("cpu", 0, "cpu", 0))
    kv = PagedKVCache.allocate(cfg, 256, torch.float32, torch.device("cpu"))
    return ModelRunner(Model(cfg, bind(arena, lay, cfg)), kv, torch.device("cpu"), 128, 6, max_tokens=40)


def _spec(i: int) -> SampleSpec:
    return SampleSpec(SamplingParams(max_tokens=4), i)


def test_worker_4720_bucket_sizes_cover_every_step(runner: ModelRunner) -> None:
    tok, rows = runner._mixed_sizes()
    assert max(tok) == runner.max_tokens and max(rows) == runner.max_batch
    assert tok == sorted(tok) and rows == sorted(rows)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0/0 in padding tiles (stored nowhere)
def test_worker_4710_padded_step_equals_eager(rowwise_dot: None, runner: ModelRunner) -> None:  # noqa: F811
    if not validate.TRITON_INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest)")
    ops.use_kernels_on_cpu(True)
    try:
        runner._alloc_mixed()
        # job A: a 9-token prompt chunk at 0 (blocks 0, 1); job B: decode at position 20 (blocks 2, 3);
        # job C: second chunk of a prompt (positions 16..22, blocks 4, 5), not sampled
        prefill = StepBatch((StepRow(0, tuple(range(3, 12)), 0, (0, 1), _spec(0)),))
        runner._eager(prefill)  # fill A's cache
        warm = StepBatch((StepRow(1, tuple(range(30, 51)), 0, (2, 3), None),
                          StepRow(2, tuple(range(60, 76)), 0, (4, 5), None)))
        runner._eager(warm)
        step = StepBatch((
            StepRow(0, (12,), 9, (0, 1), _spec(1)),
            StepRow(1, (51,), 21, (2, 3), _spec(2)),
            StepRow(2, tuple(range(76, 83)), 16, (4, 5), None),
        ))
        want = runner._eager(step)
        for key in ((16, 4), (40, 6), (9, 3)):
            runner._mixed_meta[key] = runner._mixed_views(*key)
            n = runner._mixed_fill(step, key)
            got = runner._run_mixed(key)[:n]
            assert n == 2 and torch.equal(got, want), key
    finally:
        ops.use_kernels_on_cpu(False)
