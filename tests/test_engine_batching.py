"""Continuous batching through the real engine (issue 8): concurrency, chunking and preemption never
change a job's stream (batch invariance, SPEC 4710).

CI runs these on the CPU with the real Qwen2.5-Coder-0.5B; ``-m gpu`` runs the same checks on the
GPU with a random-weight model of the same shape (the real file cannot be carried there), with more
jobs. Streams are compared token for token against the same job run alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worker_orcd.engine.api import Engine, GenerationEnd, ResidentModel, SamplingParams, TokenEvent
from worker_orcd.loader import LoadOptions, validate_model
from worker_orcd.residency import load_resident

from synthetic import synth

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n\n# normalise each row of a matrix",
    "SELECT name, COUNT(*) FROM",
]
PARAMS = [
    {"max_tokens": 8},
    {"max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 7},
    {"max_tokens": 8, "temperature": 1.0, "top_k": 40, "seed": 11, "repetition_penalty": 1.1},
    {"max_tokens": 8, "presence_penalty": 0.5, "frequency_penalty": 0.3},
]


def _ids(tok: object, text: str) -> list[int]:
    return tok.encode(text)  # type: ignore[attr-defined]


def run(rm: ResidentModel, ids: list[int], **params: object) -> tuple[list[int], GenerationEnd]:
    events = list(rm.generate(ids, SamplingParams(**params)))  # type: ignore[arg-type]
    end = events[-1]
    assert isinstance(end, GenerationEnd), end
    toks = [e.token_id for e in events[:-1] if isinstance(e, TokenEvent)]
    assert len(toks) == end.tokens_out
    return toks, end


def run_concurrently(rm: ResidentModel, jobs: list[tuple[list[int], dict[str, object]]]) -> list[list[int]]:
    out: list[list[int] | None] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        start.wait()
        out[i] = run(rm, jobs[i][0], **jobs[i][1])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert all(o is not None for o in out), "a job did not finish"
    return out  # type: ignore[return-value]


class Subject:
    def __init__(self, path: Path, device: str, **load: object) -> None:
        from worker_orcd.tokenizer import GGUFTokenizer

        v = validate_model(str(path), LoadOptions(model_root=path.parent))
        self.tok = GGUFTokenizer.from_gguf(v.gguf)
        self.engine = Engine.open(device)  # type: ignore[arg-type]
        self.validated = v
        self.rm: ResidentModel = load_resident(self.engine, v, **load)  # type: ignore[assignment]

    def load(self, **load: object) -> ResidentModel:
        return load_resident(self.engine, self.validated, **load)  # type: ignore[return-value]

    def close(self) -> None:
        self.rm.close()
        self.engine.close()


@pytest.fixture(scope="module")
def subject(device: str, serve_model_path: Path) -> Iterator[Subject]:
    # CPU: the real model (serve_model_path); GPU: its real-shape synthetic twin
    s = Subject(serve_model_path, device, kv_cache_mb=256, max_batch=8, prefill_chunk=64)
    yield s
    s.close()


@pytest.fixture(scope="module")
def alone(subject: Subject) -> list[list[int]]:
    return [run(subject.rm, _ids(subject.tok, p), **q)[0] for p, q in zip(PROMPTS, PARAMS, strict=True)]


@pytest.mark.slow
def test_worker_4710_concurrent_jobs_stream_exactly_as_alone(subject: Subject, alone: list[list[int]]) -> None:
    jobs = [(_ids(subject.tok, p), q) for p, q in zip(PROMPTS, PARAMS, strict=True)]
    assert run_concurrently(subject.rm, jobs) == alone
    # and again in another order of arrival (other batch positions)
    assert run_concurrently(subject.rm, jobs[::-1]) == alone[::-1]


@pytest.mark.slow
def test_worker_4710_overlapped_steps_stream_exactly_as_alone(subject: Subject, alone: list[list[int]]) -> None:
    """Host-free jobs (greedy, seeded top-p) run with overlapped steps: the next step is queued
    before this one's tokens are read, its rows reading them on the device. Streams unchanged."""
    jobs = [(_ids(subject.tok, PROMPTS[i]), PARAMS[i]) for i in (0, 1, 1, 0)]
    before = subject.rm.runner.pending_reads
    assert run_concurrently(subject.rm, jobs) == [alone[i] for i in (0, 1, 1, 0)]
    assert subject.rm.runner.pending_reads > before, "the steps were meant to overlap"


@pytest.mark.slow
def test_worker_4710_prompt_chunking_does_not_change_logits_or_stream(subject: Subject, alone: list[list[int]]) -> None:
    ids = _ids(subject.tok, PROMPTS[2]) + _ids(subject.tok, " and then print the result " * 4)
    whole = subject.rm.runner.prefill_logits(ids)
    for chunk in (1, 5, 16, 33):
        assert torch.equal(subject.rm.runner.prefill_logits(ids, chunk=chunk), whole), f"chunk {chunk}"
    # the engine's own chunking: a 3-token budget per step splits every prompt into pieces
    rm = subject.load(kv_cache_mb=64, max_batch=4, prefill_chunk=16)
    try:
        rm.batching = type(rm.batching)(max_batch=4, token_budget=16)
        jobs = [(_ids(subject.tok, p), q) for p, q in zip(PROMPTS, PARAMS, strict=True)]
        assert run_concurrently(rm, jobs) == alone
    finally:
        rm.close()


@pytest.mark.slow
def test_worker_4720_mixed_step_tokens_caps_steps_with_decode_rows(subject: Subject, alone: list[list[int]]) -> None:
    """--mixed-step-tokens: the cap of a step that has decode rows (never below the decode rows), the
    streams unchanged by it; a bad value is refused before anything loads."""
    from worker_orcd.errors import InvalidParams

    for cap, want in ((24, 24), (2, 4)):  # 2 < max_batch 4: every running job still gets its row
        rm = subject.load(kv_cache_mb=64, max_batch=4, prefill_chunk=64, mixed_step_tokens=cap)
        try:
            assert rm.batching.mixed_budget == want and rm.batching.token_budget == 64
            if cap == 2:
                jobs = [(_ids(subject.tok, p), q) for p, q in zip(PROMPTS, PARAMS, strict=True)]
                assert run_concurrently(rm, jobs) == alone
        finally:
            rm.close()
    with pytest.raises(InvalidParams, match="mixed_step_tokens must be a positive integer"):
        subject.load(kv_cache_mb=64, mixed_step_tokens=0)


@pytest.mark.slow
def test_worker_4710_decode_logits_equal_recomputed_prefill(subject: Subject) -> None:
    """What preemption relies on: the logits a decode step produced equal a from-scratch prefill of the
    same tokens (same kernels, same per-row reduction order), bit for bit."""
    rm = subject.rm
    ids = _ids(subject.tok, PROMPTS[0])
    toks, _ = run(rm, ids, max_tokens=6)
    seq = list(ids)
    for t in toks:
        logits = rm.runner.prefill_logits(seq)
        assert int(torch.argmax(logits)) == t
        seq.append(t)


@pytest.mark.slow
def test_worker_4720_preemption_keeps_every_stream_identical(subject: Subject, alone: list[list[int]]) -> None:
    """A KV pool too small for all four jobs: the youngest is preempted and recomputed, nothing else changes."""
    cfg = subject.rm.config
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (4 if subject.engine.dev_mode else 2)
    lengths = [len(_ids(subject.tok, p)) + 8 for p in PROMPTS]
    mb = max(1, -(-(max(lengths) + 16) * per_token // (1 << 20)))  # about one job's worth of blocks
    rm = subject.load(kv_cache_mb=int(mb), max_batch=4, prefill_chunk=64)
    try:
        jobs = [(_ids(subject.tok, p), q) for p, q in zip(PROMPTS, PARAMS, strict=True)]
        assert run_concurrently(rm, jobs) == alone
        blocks_needed = sum(-(-n // 16) for n in lengths)
        if blocks_needed > rm.stats()["kv_blocks_total"]:
            assert rm.stats()["preemptions"] > 0, "the pool could not hold every job: someone must have been preempted"
    finally:
        rm.close()


@pytest.mark.gpu
def test_worker_4710_gpu_64_jobs_bitwise_as_alone(subject: Subject) -> None:
    """On the GPU: 64 concurrent seeded and greedy jobs (several CUDA-graph buckets, mixed prefill and
    decode steps) each give exactly the stream they give alone."""
    g = torch.Generator().manual_seed(5)
    jobs = []
    for i in range(64):
        ids = torch.randint(0, subject.rm.config.vocab_size, (int(torch.randint(3, 200, (1,), generator=g)),), generator=g)
        p: dict[str, object] = {"max_tokens": 24}
        if i % 2:
            p.update(temperature=0.9, top_p=0.95, seed=i)
        jobs.append((ids.tolist(), p))
    rm = subject.load(max_batch=64, prefill_chunk=256)
    try:
        lone = [run(rm, ids, **p)[0] for ids, p in jobs[:16]]
        together = run_concurrently(rm, jobs)
        assert together[:16] == lone
    finally:
        rm.close()


@pytest.mark.gpu
def test_worker_4710_gpu_mixed_step_graph_equals_eager(subject: Subject) -> None:
    """Steps with prompt chunks replay a graph captured per (tokens, rows) bucket: its padding is inert
    and every sampled row's logits equal the eager step's, bit for bit."""
    from worker_orcd.batching.step import SampleSpec, StepBatch, StepRow

    runner = subject.rm.runner
    assert runner.mixed_graphs, "steps with prompt chunks must replay captured graphs"
    nb = runner.num_blocks  # the highest blocks: outside the engine loop's bookkeeping, no job runs now
    a, b, c = (nb - 2, nb - 1), (nb - 4, nb - 3), (nb - 6, nb - 5)
    g = torch.Generator().manual_seed(9)
    vocab = subject.rm.config.vocab_size

    def toks(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, vocab, (n,), generator=g).tolist())

    spec = SampleSpec(SamplingParams(max_tokens=1), 0)
    runner.logits(StepBatch((StepRow(-1, toks(20), 0, a, None), StepRow(-1, toks(25), 0, b, None))), eager=True)
    step = StepBatch((StepRow(-1, toks(1), 20, a, spec), StepRow(-1, toks(1), 25, b, spec),
                      StepRow(-1, toks(30), 0, c, spec)))
    want = runner.logits(step, eager=True).clone()
    assert runner._mixed_bucket(step) is not None
    got = runner.logits(step)
    assert got.shape == want.shape and torch.equal(got, want)
