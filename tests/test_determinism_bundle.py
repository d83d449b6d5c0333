"""Determinism suite (SPEC 4710, 4999) with its proof bundle (4996).

The engine runs the same request three times on a tiny synthetic Qwen2
model (CPU here, the GPU under REQUIRE_REAL_GPU=1) and once more on a
second load of the same file; every stream must be identical, and each is
recorded with its seed, parameters, the model's digest and the timings, so
streams from different machines can be compared from the bundles (5000).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proof_bundle import ProofBundle

from worker_orcd.engine.api import (
    Engine,
    GenerationEnd,
    ResidentModel,
    SamplingParams,
    TokenEvent,
)
from worker_orcd.loader import LoadOptions, ValidatedModel, validate_model
from worker_orcd.residency import load_sealed
from worker_orcd.seal import Sealer
from synthetic import synth as _synth

REPO = Path(__file__).resolve().parents[1]
PROMPT = [1, 17, 42, 99, 250, 7, 300, 5]
RUNS = 3
CASES = {
    "greedy": SamplingParams(max_tokens=16),
    "greedy-penalty": SamplingParams(max_tokens=16, repetition_penalty=2.0),  # random weights loop; this does not
    "sampled": SamplingParams(max_tokens=16, temperature=0.8, top_k=40, top_p=0.95, seed=1234567890123),
    "sampled-penalty": SamplingParams(max_tokens=16, temperature=1.2, min_p=0.02, repetition_penalty=1.3, seed=2**64 - 1),
}




@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> ValidatedModel:
    path = _synth().write_synthetic_model(tmp_path_factory.mktemp("det") / "det-qwen2.gguf", "tiny-qwen2", "Q8_0")
    return validate_model(path.name, LoadOptions(model_root=path.parent))


@pytest.fixture(scope="module")
def engine(device: str) -> Iterator[Engine]:
    eng = Engine.open(device, 0)  # type: ignore[arg-type]
    yield eng
    eng.close()


def load(engine: Engine, validated: ValidatedModel, shard: str) -> ResidentModel:
    return load_sealed(engine, validated, shard_id=shard, sealer=Sealer(), kv_cache_mb=1).resident  # type: ignore[return-value]


def run(model: ResidentModel, params: SamplingParams) -> tuple[list[int], GenerationEnd, float]:
    t0 = time.perf_counter()
    tokens: list[int] = []
    end: GenerationEnd | None = None
    for ev in model.generate(PROMPT, params):
        if isinstance(ev, TokenEvent):
            assert ev.index == len(tokens)
            tokens.append(ev.token_id)
        else:
            end = ev
    assert end is not None and end.tokens_out == len(tokens) and end.tokens_in == len(PROMPT)
    return tokens, end, time.perf_counter() - t0


@pytest.mark.parametrize("case", list(CASES))
def test_worker_4999_same_request_same_stream_across_runs_and_loads(
    case: str, engine: Engine, validated: ValidatedModel, device: str, proof_bundle: ProofBundle
) -> None:
    params = CASES[case]
    proof_bundle.model_digest("model", sha256=validated.digest, size=validated.size, file=validated.source.path.name,
                              shape="tiny-qwen2", weight_type="Q8_0", device=device)
    streams: list[list[int]] = []
    first = load(engine, validated, "det-a")
    try:
        for i in range(RUNS):
            tokens, end, seconds = run(first, params)
            streams.append(tokens)
            proof_bundle.token_stream(
                f"run-{i + 1}", tokens, seed=params.seed, params=_params(params), prompt=PROMPT,
                stop_reason=end.stop_reason, load="det-a",
            )
            proof_bundle.timing(f"run-{i + 1}", seconds, prefill_ms=end.prefill_ms, ttft_ms=end.ttft_ms,
                                decode_time_ms=end.decode_time_ms, tokens=end.tokens_out)
    finally:
        first.close()
    second = load(engine, validated, "det-b")  # a fresh upload of the same bytes: same stream
    try:
        tokens, end, seconds = run(second, params)
    finally:
        second.close()
    streams.append(tokens)
    proof_bundle.token_stream("reload", tokens, seed=params.seed, params=_params(params), prompt=PROMPT,
                              stop_reason=end.stop_reason, load="det-b")
    proof_bundle.record("verdict", {"identical": all(s == streams[0] for s in streams), "runs": len(streams)})
    assert len(streams[0]) == params.max_tokens  # stop_ids empty: every run goes the full length
    assert all(s == streams[0] for s in streams), streams


def test_worker_4999_seed_changes_the_sampled_stream(engine: Engine, validated: ValidatedModel, proof_bundle: ProofBundle) -> None:
    """The seed is really used: two seeds, two streams (the check above cannot fail by ignoring it)."""
    model = load(engine, validated, "det-seed")
    try:
        a, _, _ = run(model, dataclasses.replace(CASES["sampled"], seed=1))
        b, _, _ = run(model, dataclasses.replace(CASES["sampled"], seed=2))
    finally:
        model.close()
    proof_bundle.token_stream("seed-1", a, seed=1, params=_params(CASES["sampled"]), prompt=PROMPT)
    proof_bundle.token_stream("seed-2", b, seed=2, params=_params(CASES["sampled"]), prompt=PROMPT)
    assert a != b


def _params(p: SamplingParams) -> dict[str, object]:
    out = dataclasses.asdict(p)
    out["stop_ids"] = sorted(p.stop_ids)
    return out
