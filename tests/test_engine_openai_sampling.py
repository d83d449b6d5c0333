"""The single-job CPU loop's OpenAI sampling features (SamplingParams in engine/events.py):
presence/frequency penalties, logprobs, and a token constraint (packed bitmask)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker_orcd.engine.api import Engine, ResidentModel, SamplingParams, TokenEvent
from worker_orcd.loader import LoadOptions, validate_model
from worker_orcd.residency import load_resident
from synthetic import synth as _synth

PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> ResidentModel:
    path = _synth().write_synthetic_model(tmp_path_factory.mktemp("m") / "tiny-qwen2.gguf", "tiny-qwen2", "Q4_K_M")
    engine = Engine.open("cpu")
    return load_resident(engine, validate_model(str(path), LoadOptions(model_root=path.parent)), kv_cache_mb=1)  # type: ignore[return-value]


def _events(model: ResidentModel, **kw: object) -> list[TokenEvent]:
    return [e for e in model.generate(PROMPT, SamplingParams(**kw), None) if isinstance(e, TokenEvent)]  # type: ignore[arg-type]


class OnlyTokens:
    """Allows a fixed set of ids; records what the engine accepted."""

    def __init__(self, vocab: int, ids: set[int]) -> None:
        words = np.zeros((vocab + 31) // 32, dtype=np.uint32)
        for t in ids:
            words[t // 32] |= np.uint32(1 << (t % 32))
        self.mask, self.accepted = words.view(np.int32), []  # type: ignore[var-annotated]

    def allowed(self) -> np.ndarray:
        return self.mask

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)


def test_constraint_restricts_every_token_and_sees_each_one(qwen: ResidentModel) -> None:
    vocab = qwen.config.vocab_size
    free = [e.token_id for e in _events(qwen, max_tokens=6)]
    allowed = {t for t in range(vocab) if t not in free}
    allowed = set(sorted(allowed)[::7][:5]) | {vocab - 1}  # includes the last id (bit 31 sign of a word)
    for temperature in (0.0, 0.8):
        c = OnlyTokens(vocab, allowed)
        got = [e.token_id for e in _events(qwen, max_tokens=6, temperature=temperature, seed=3, constraint=c)]
        assert set(got) <= allowed and c.accepted == got


def test_frequency_penalty_changes_greedy_choice_and_zero_is_neutral(qwen: ResidentModel) -> None:
    base = [e.token_id for e in _events(qwen, max_tokens=12)]
    assert [e.token_id for e in _events(qwen, max_tokens=12, frequency_penalty=0.0)] == base
    pen = [e.token_id for e in _events(qwen, max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0)]
    assert len(set(base)) < len(base), "precondition: the tiny model's greedy stream repeats a token"
    assert len(set(pen)) > len(set(base))  # the penalties make repeats rarer


def test_logprobs_are_the_raw_distribution(qwen: ResidentModel) -> None:
    ev = _events(qwen, max_tokens=4, logprobs=True, top_logprobs=3)
    plain = [e.token_id for e in _events(qwen, max_tokens=4)]
    assert [e.token_id for e in ev] == plain
    for e in ev:
        assert e.logprob is not None and e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0][0] == e.token_id  # greedy: the chosen token is the most likely
        assert abs(e.top_logprobs[0][1] - e.logprob) < 1e-5
        probs = [v for _, v in e.top_logprobs]
        assert probs == sorted(probs, reverse=True)
    first = qwen.generate(PROMPT, SamplingParams(max_tokens=1, logprobs=True), None)
    e0 = next(iter(first))
    assert e0.logprob is not None and e0.top_logprobs == ()
    assert torch.isfinite(torch.tensor(e0.logprob))
