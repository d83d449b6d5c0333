"""The split-attention slot fallback on a real GPU (engine/runner.py, kernels/attention_paged.py).

Decode graphs run the split + merge attention passes over a partials scratch of
``ModelRunner.split_slots`` slots. A decode step whose rows need more slots than that
(Σ (start // S + 1) over the rows, + one per padding row) does not replay its decode graph:
the runner counts ``split_fallbacks`` and runs the step in one pass (a mixed-step graph, or
eager launches when none holds it). Both ways are bitwise the same reduction order, so the
fallback must give exactly the logits and tokens of the split path.

The fallback is forced with a second runner over the same weights and KV cache whose scratch
is captured with only a few slots (``split_slots`` set before ``capture()`` allocates it): a
lone decode row still fits it (split passes on the small scratch), a batch of long rows does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from synthetic import synth as _synth

from worker_orcd.batching.step import SampleSpec, StepBatch, StepRow
from worker_orcd.engine.api import Engine, ResidentModel, SamplingParams
from worker_orcd.engine.runner import ModelRunner
from worker_orcd.loader import LoadOptions, validate_model
from worker_orcd.residency import load_resident

pytestmark = pytest.mark.gpu

# (synthetic shape, file weight type): Qwen2.5-0.5B geometry (head dim 64: S = 128 keys per split) and
# Gemma 3 270M's (head dim 256: S = 64, a 512-token window on the local layers)
SHAPES = [("mid-qwen2", "Q8_0"), ("mid-gemma3", "Q4_K_M")]
CONTEXTS = (700, 1000, 1500)  # the decode rows' tokens already in the cache (past gemma's window)
STEPS = 4  # decode steps per row
PREFILL_CHUNK = 256
PARAMS = [  # greedy and seeded draws: the tokens follow the logits bit for bit
    SamplingParams(max_tokens=STEPS),
    SamplingParams(max_tokens=STEPS, temperature=0.8, top_p=0.9, seed=7),
    SamplingParams(max_tokens=STEPS, temperature=1.0, top_k=40, seed=11),
]


@dataclass
class Subject:
    engine: Engine
    rm: ResidentModel
    runner: ModelRunner  # the model's own runner: the full scratch (split_scratch_slots)
    small: ModelRunner  # the same weights and KV cache, a scratch of a few slots


def _splits(runner: ModelRunner, starts: list[int]) -> int:
    """Partial slots a decode step of rows at ``starts`` takes in ``runner`` (as ModelRunner._replay counts)."""
    b = min(x for x in runner.graphs if x >= len(starts))
    return sum(s // runner.split_s + 1 for s in starts) + (b - len(starts))


@pytest.fixture(scope="module", params=SHAPES, ids=lambda p: p[0])
def subject(request: pytest.FixtureRequest, device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Subject]:
    shape, wtype = request.param
    out = tmp_path_factory.mktemp("split-fallback") / f"{shape}.gguf"
    path: Path = _synth().write_synthetic_model(out, shape, wtype)
    engine = Engine.open(device)  # type: ignore[arg-type]
    rm: ResidentModel = load_resident(  # type: ignore[assignment]
        engine, validate_model(str(path), LoadOptions(model_root=path.parent)), kv_cache_mb=64, max_batch=8,
        prefill_chunk=64,
    )
    runner = rm.runner
    small = ModelRunner(runner.model, runner.kv, runner.device, runner.max_seq_len, runner.max_batch,
                        max_tokens=runner.max_tokens)
    # enough slots for the shortest row alone at its last step, far fewer than the batch of rows needs; at
    # least the largest bucket, whose capture warm-up puts one row on each of slots 0 .. b-1
    small.split_slots = max(runner.max_batch, (CONTEXTS[0] + STEPS - 1) // small.split_s + 1)
    try:
        small.capture()
        yield Subject(engine, rm, runner, small)
    finally:
        small.close()
        rm.close()
        engine.close()


def test_worker_4710_split_slot_fallback_equals_split_path(subject: Subject) -> None:
    """Rows that overflow the partials scratch: the decode step falls back to one pass (a mixed-step
    graph; eager launches when no mixed graph holds it) with bitwise the split path's logits and tokens."""
    runner, small = subject.runner, subject.small
    assert runner.graphs and small.graphs and small.mixed_graphs, "both runners must have captured graphs"
    assert small._split is not None and small._split[0].shape[0] == small.split_slots < runner.split_slots
    vocab, bs, nb = runner.vocab_size, runner.block_size, runner.num_blocks
    g = torch.Generator().manual_seed(4711)

    # the rows' KV blocks: the highest of the pool (outside the engine loop's bookkeeping; no job runs)
    tables: list[tuple[int, ...]] = []
    top = nb
    for ctx in CONTEXTS:
        need = -(-(ctx + STEPS) // bs)
        tables.append(tuple(range(top - need, top)))
        top -= need
    assert top >= 0, f"the KV pool ({nb} blocks of {bs}) is too small for the test's rows"
    prompts = [tuple(torch.randint(0, vocab, (ctx,), generator=g).tolist()) for ctx in CONTEXTS]
    for c0 in range(0, max(CONTEXTS), PREFILL_CHUNK):  # the rows' contexts into the cache, in chunks
        runner.logits(StepBatch(tuple(StepRow(-1, p[c0 : c0 + PREFILL_CHUNK], c0, t, None)
                                      for p, t in zip(prompts, tables, strict=True) if c0 < len(p))), eager=True)

    ref_before, small_before = runner.split_fallbacks, small.split_fallbacks
    tokens = [int(torch.randint(0, vocab, (1,), generator=g)) for _ in CONTEXTS]
    for i in range(STEPS):
        starts = [ctx + i for ctx in CONTEXTS]
        batch = StepBatch(tuple(
            StepRow(-1, (tok,), s, t, SampleSpec(p, i))
            for tok, s, t, p in zip(tokens, starts, tables, PARAMS, strict=True)
        ))
        assert _splits(runner, starts) <= runner.split_slots, "the reference must take the split path"
        assert _splits(small, starts) > small.split_slots, "the small scratch must overflow"
        assert small._mixed_bucket(batch) is not None, "the fallback should replay a mixed-step graph"

        want = runner.logits(batch, eager=True).clone()
        ref = runner.logits(batch).clone()  # decode graph: split + merge passes
        got = small.logits(batch).clone()  # fallback: mixed-step graph, one pass
        assert small.split_fallbacks == small_before + 2 * i + 1, "the step did not fall back"
        assert torch.isfinite(want).all()
        assert ref.shape == got.shape == want.shape == (len(CONTEXTS), vocab)
        assert torch.equal(ref, want), f"step {i}: split decode graph != eager"
        assert torch.equal(got, ref), f"step {i}: slot fallback != split decode graph"

        ref_tok = [s.token_id for s in runner.step(batch)]
        got_tok = [s.token_id for s in small.step(batch)]
        assert small.split_fallbacks == small_before + 2 * i + 2
        assert got_tok == ref_tok, f"step {i}: sampled tokens differ"

        # the shortest row alone fits the small scratch: split + merge passes over its few slots
        lone = StepBatch((StepRow(-1, (tokens[0],), starts[0], tables[0], SampleSpec(PARAMS[0], i)),))
        assert _splits(small, starts[:1]) <= small.split_slots
        lone_want = runner.logits(lone, eager=True).clone()
        lone_got = small.logits(lone).clone()
        assert small.split_fallbacks == small_before + 2 * i + 2, "a lone row must not fall back"
        assert torch.equal(lone_got, lone_want), f"step {i}: split passes on the small scratch != eager"
        tokens = ref_tok

    # no mixed-step graph holds the step: the fallback runs it eagerly, with the same numbers again
    mixed = dict(small.mixed_graphs)
    small.mixed_graphs.clear()
    try:
        got = small.logits(batch).clone()
    finally:
        small.mixed_graphs.update(mixed)
    assert small.split_fallbacks == small_before + 2 * STEPS + 1
    assert torch.equal(got, ref), "eager fallback != split decode graph"
    assert runner.split_fallbacks == ref_before, "the full scratch must never fall back"
