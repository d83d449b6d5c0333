"""Tensor parallel over NCCL on two GPUs (issue 12): the gloo tests' checks on the x2 GPU machine.

Two `worker-orcd serve` processes, rank r on cuda:r, on a synthetic Qwen2.5-0.5B-shaped F16 model
with the real tokenizer (the real models are not carried to the GPU machine;
WORKER_ORCD_TOKENIZER_DONOR names the donor, as benchmarks/run_h200.sh sets it): the group forms
over NCCL, a process with another secret is refused and never joins, the same request gives the
same tokens twice (a fixed all-reduce order), and tp=2's greedy tokens equal tp=1's (a model
loaded in this process on cuda:0) up to tp=1's first near-tie. Marked ``multi_gpu``: runs with
REQUIRE_MULTI_GPU=1 (and REQUIRE_REAL_GPU=1), skipped elsewhere — the one-GPU suite leaves it out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from callback_server import CallbackServer
from test_serve_integration import start, wait_ready, write_tokens
from test_tensor_parallel import PROMPT, TIE_GAP, Group, _args, _free_port, _secret, _sse

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]

N_GREEDY = 16


def _cuda(rank: int) -> tuple[str, ...]:
    return ("--device", "cuda", "--gpu-device", str(rank))


def _synthetic(tmp_path_factory: pytest.TempPathFactory, wtype: str) -> Path:
    """A Qwen2.5-0.5B-shaped model of ``wtype`` with the real tokenizer (the donor's)."""
    import torch

    from synthetic import synth

    assert torch.cuda.device_count() >= 2, "REQUIRE_MULTI_GPU=1 but fewer than two CUDA devices"
    donor = os.environ.get("WORKER_ORCD_TOKENIZER_DONOR")
    assert donor and Path(donor).is_file(), "set WORKER_ORCD_TOKENIZER_DONOR to the tokenizer donor GGUF"
    path = tmp_path_factory.mktemp(f"tp-gpu-{wtype}") / f"qwen05-{wtype.lower()}.gguf"
    return synth().write_synthetic_model(path, "qwen2.5-0.5b", wtype, tokenizer_from=donor)


def _group(model: Path, tmp: Path, group_id: str, extra: list[str], intruder: bool) -> Iterator[Group]:
    """Rank 0 on cuda:0 (serving), rank 1 on cuda:1; ``intruder``: first a rank 1 with another secret,
    which must exit 1 without joining."""
    token_file, token, _ = write_tokens(tmp)
    port = _free_port()
    secret = _secret(tmp, f"{group_id}.secret", "group-secret-" + "7" * 24)
    with CallbackServer() as pm:
        rank0 = start(tmp, _args(model, 0, port, secret, group_id, ["--port", "0", "--callback-url", pm.url, *extra],
                                 _cuda(0)), token_file)
        if intruder:
            wrong = _secret(tmp, "wrong.secret", "not-the-secret-" + "3" * 24)
            bad = start(tmp, _args(model, 1, port, wrong, group_id, list(extra), _cuda(1)), None)
            assert bad.proc.wait(180) == 1, bad.log.read_text()[-3000:]
        rank1 = start(tmp, _args(model, 1, port, secret, group_id, list(extra), _cuda(1)), None)
        try:
            wait_ready(rank0, pm)
            yield Group(rank0, rank1, pm, token, tmp)
        finally:
            for p in (rank0, rank1):
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait(30)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic(tmp_path_factory, "F16")


@pytest.fixture(scope="module")
def group(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    yield from _group(model, tmp_path_factory.mktemp("tp-gpu-group"), "g-nccl", [], intruder=True)


def _greedy(g: Group) -> list[str]:
    with g.rank0.client(g.token) as c:
        events = _sse(c, {"prompt": PROMPT, "params": {"max_tokens": N_GREEDY, "temperature": 0}})
    assert events[-1][0] == "end", events[-3:]
    return [d["t"] for e, d in events if e == "token"]


def test_tp2_nccl_forms_refuses_a_wrong_secret_and_is_deterministic(group: Group) -> None:
    assert group.rank1.proc.poll() is None, group.rank1.log.read_text(errors="replace")[-2000:]
    with group.rank0.client(group.token) as c:
        ready = c.get("/worker/ready").json()
    assert ready["ready"] and ready["nccl_group_id"] == "g-nccl", ready
    assert ready["handles"][0]["total_shards"] == 2
    first, second = _greedy(group), _greedy(group)
    assert len(first) == N_GREEDY and first == second


def _tp1_reference(model: Path, resident_weights: str) -> tuple[list[str], int, list[float]]:
    """tp=1 on cuda:0 in this process: greedy text pieces, the reliable prefix (before the first near-tie)."""
    import torch

    from worker_orcd.engine.api import Engine, SamplingParams, TokenEvent
    from worker_orcd.loader import LoadOptions, validate_model
    from worker_orcd.residency import load_resident
    from worker_orcd.tokenizer import GGUFTokenizer

    v = validate_model(model.name, LoadOptions(model_root=model.parent))
    tok = GGUFTokenizer.from_gguf(v.gguf)
    m = load_resident(Engine.open("cuda", 0, resident_weights=resident_weights), v, kv_cache_mb=256)
    try:
        ids = tok.encode(PROMPT)
        got = [e.token_id for e in m.generate(ids, SamplingParams(max_tokens=N_GREEDY)) if isinstance(e, TokenEvent)]
        gaps = []
        for i in range(len(got)):
            top = m.runner.prefill_logits(ids + got[:i]).float().topk(2).values
            gaps.append(float(top[0] - top[1]))
    finally:
        m.close()
        torch.cuda.empty_cache()
    n = next((i for i, gap in enumerate(gaps) if gap <= TIE_GAP), len(got))
    detok = tok.stream()
    return [detok.push(t) for t in got], n, gaps


def test_tp2_nccl_greedy_equals_tp1_on_the_reliable_prefix(group: Group, model: Path) -> None:
    want, n, gaps = _tp1_reference(model, "dense")
    assert _greedy(group)[:n] == want[:n], f"reliable prefix {n} of {len(want)} (gaps {[round(x, 3) for x in gaps]})"


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic(tmp_path_factory, "Q8_0")


@pytest.fixture(scope="module")
def qgroup(q8_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    """Two ranks with the quantized residency: each keeps its share of the file's Q8_0 blocks."""
    yield from _group(q8_model, tmp_path_factory.mktemp("tp-gpu-qgroup"), "g-q8", ["--resident-weights", "quantized"],
                      intruder=False)


def test_tp2_quantized_shards_greedy_equals_tp1_quantized(qgroup: Group, q8_model: Path) -> None:
    with qgroup.rank0.client(qgroup.token) as c:
        ready = c.get("/worker/ready").json()
    assert ready["ready"] and ready["handles"][0]["total_shards"] == 2, ready
    first = _greedy(qgroup)
    assert first == _greedy(qgroup)
    want, n, gaps = _tp1_reference(q8_model, "quantized")
    assert first[:n] == want[:n], f"reliable prefix {n} of {len(want)} (gaps {[round(x, 3) for x in gaps]})"
