"""On-device sampling: greedy, penalty, temperature, top-k/top-p/min-p, seeded Gumbel-max (SPEC 4700, 4710-4712)."""

from __future__ import annotations


import pytest
import torch

from worker_orcd.engine.errors import KernelDimensionError, KernelParamError
from worker_orcd.engine.kernels.sampling import filtered_probs_reference, sample, sample_draws

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, penalty_ids=None, seed=0, step=0)




def params(**overrides: object) -> dict:
    return {**GREEDY, **overrides}


def fresh_seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen)) * 4 + int(torch.randint(0, 4, (1,), generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 50001])
def test_worker_4700_greedy_is_argmax(gen: torch.Generator, device: str, dtype: torch.dtype, vocab: int) -> None:
    logits = (torch.randn(vocab, generator=gen) * 4).to(device=device, dtype=dtype)
    token = sample(logits, **params())
    assert token.dtype == torch.int64 and token.shape == (1,) and token.device == logits.device
    assert int(token) == int(torch.argmax(logits.float()))


def test_worker_4700_greedy_ties_go_to_lowest_index(device: str) -> None:
    logits = torch.zeros(3000, device=device)
    logits[[2500, 1700, 2999]] = 5.0
    assert int(sample(logits, **params())) == 1700
    assert int(sample(torch.zeros(4097, device=device), **params())) == 0


def test_worker_4712_same_seed_and_step_same_token(gen: torch.Generator, device: str) -> None:
    logits = torch.randn(5000, generator=gen).to(device)
    seed = fresh_seed(gen)
    p = params(temperature=1.3, top_k=0, seed=seed, step=17)
    first = sample(logits, **p)
    assert all(torch.equal(first, sample(logits, **p)) for _ in range(3))
    steps = [int(sample(logits, **params(temperature=1.3, seed=seed, step=100 + i))) for i in range(6)]
    assert sample_draws(logits, n_draws=6, **params(temperature=1.3, seed=seed, step=100)).tolist() == steps


def test_worker_4712_steps_and_seeds_draw_fresh_noise(gen: torch.Generator, device: str) -> None:
    logits = torch.zeros(64, device=device)  # uniform: every draw is pure noise
    seed = fresh_seed(gen)
    by_step = sample_draws(logits, n_draws=200, **params(temperature=1.0, seed=seed, step=2**40 - 100))
    assert len(set(by_step.tolist())) > 40
    by_seed = [int(sample(logits, **params(temperature=1.0, seed=seed + i, step=5))) for i in range(12)]
    assert len(set(by_seed)) > 3
    high = [int(sample(logits, **params(temperature=1.0, seed=s, step=5))) for s in (2**64 - 1, 2**64 - 2, 2**63)]
    assert len(set(high)) > 1  # the high 32 bits of the seed reach the generator


def chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a filtered-out token was drawn"
    expected = probs[keep] * n
    return float(((counts[keep] - expected) ** 2 / expected).sum())


FILTERS = [
    dict(),
    dict(temperature=0.6),
    dict(top_k=3),
    dict(top_p=0.8),
    dict(top_k=4, top_p=0.7),
    dict(min_p=0.15),
    dict(top_k=5, top_p=0.9, min_p=0.1, temperature=1.7),
    dict(repetition_penalty=1.7, penalty_ids=[0, 3, 3, 5]),
]


@pytest.mark.parametrize("cfg", FILTERS, ids=lambda c: "-".join(c) or "plain")
def test_worker_4700_distribution_matches_filtered_softmax(gen: torch.Generator, device: str, cfg: dict) -> None:
    """4000 draws on V=6 vs the float64 filtered softmax; chi-square with df <= 5 below 40 (p ~ 1e-7)."""
    logits = torch.tensor([1.5, 0.8, -0.4, 1.1, -1.0, 0.3], device=device) + torch.randn(6, generator=gen).to(device) * 0.2
    cfg = dict(cfg)
    if "penalty_ids" in cfg:
        cfg["penalty_ids"] = torch.tensor(cfg["penalty_ids"], device=device)
    p = params(**{"temperature": 1.0, **cfg})
    p["seed"] = fresh_seed(gen)
    n = 4000
    draws = sample_draws(logits, n_draws=n, **p)
    counts = torch.bincount(draws.cpu(), minlength=6).double()
    ref = filtered_probs_reference(logits.cpu(), **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in p.items()
                                                    if k not in ("seed", "step")})
    assert chi_square(counts, ref, n) < 40.0, (counts / n, ref)


def test_worker_4700_top_k_1_and_tiny_top_p_are_greedy(gen: torch.Generator, device: str) -> None:
    for _ in range(2):
        logits = torch.randn(1000, generator=gen).to(device)
        greedy = int(sample(logits, **params()))
        seed = fresh_seed(gen)
        assert int(sample(logits, **params(temperature=1.5, top_k=1, seed=seed))) == greedy
        assert int(sample(logits, **params(temperature=1.5, top_p=1e-6, seed=seed))) == greedy
        assert set(sample_draws(logits, n_draws=32, **params(temperature=2.0, top_k=1, seed=seed)).tolist()) == {greedy}


def test_worker_4700_min_p_filters(gen: torch.Generator, device: str) -> None:
    """p_i >= min_p * p_max survives; everything below is never drawn."""
    logits = torch.tensor([3.0, 2.9, 1.5, 0.0, -1.0, 2.95], device=device)
    probs = torch.softmax(logits.double(), 0)
    survivors = set((probs >= 0.3 * probs.max()).nonzero().flatten().tolist())
    draws = set(sample_draws(logits, n_draws=2000, **params(temperature=1.0, min_p=0.3, seed=fresh_seed(gen))).tolist())
    assert draws == survivors == {0, 1, 5}


def test_worker_4700_repetition_penalty_changes_argmax(device: str) -> None:
    """Positive logits are divided, negative ones multiplied; repeated ids are penalised once."""
    pos = torch.tensor([2.0, 1.9, 0.5], device=device)
    assert int(sample(pos, **params())) == 0
    assert int(sample(pos, **params(repetition_penalty=1.2, penalty_ids=torch.tensor([0], device=device)))) == 1
    neg = torch.tensor([-5.0, -1.0, -1.1], device=device)
    assert int(sample(neg, **params(repetition_penalty=1.2, penalty_ids=torch.tensor([1], device=device)))) == 2
    once = torch.tensor([2.0, 1.5], device=device)  # 2.0 / 1.2 = 1.67 > 1.5, but / 1.2^2 = 1.39 < 1.5
    ids = torch.tensor([0, 0, 0], dtype=torch.int32, device=device)
    assert int(sample(once, **params(repetition_penalty=1.2, penalty_ids=ids))) == 0
    outside = torch.tensor([-7, 3, 2**31 - 1], device=device)  # out-of-vocabulary ids are ignored
    assert int(sample(pos, **params(repetition_penalty=1.2, penalty_ids=outside))) == 0
    empty = torch.tensor([], dtype=torch.int64, device=device)
    assert int(sample(pos, **params(repetition_penalty=1.2, penalty_ids=empty))) == 0


def test_worker_4711_sampling_deterministic(gen: torch.Generator, device: str) -> None:
    logits = torch.randn(4000, generator=gen).to(device=device, dtype=torch.bfloat16)
    p = params(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.1,
               penalty_ids=torch.randint(0, 4000, (40,), generator=gen).to(device), seed=fresh_seed(gen), step=3)
    a = sample_draws(logits, n_draws=8, **p)
    b = sample_draws(logits, n_draws=8, **p)
    assert torch.equal(a, b)


def test_worker_4400_sampling_rejects_bad_params(device: str) -> None:
    logits = torch.randn(10, device=device)
    bad = [
        ("temperature", -0.1), ("temperature", 2.01), ("temperature", float("nan")),
        ("top_k", -1), ("top_k", 2.0), ("top_k", True),
        ("top_p", 0.0), ("top_p", 1.01),
        ("min_p", -0.01), ("min_p", 1.0),
        ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
        ("seed", -1), ("seed", 2**64), ("seed", 1.5), ("step", -1), ("step", 2**64),
    ]
    for name, value in bad:
        with pytest.raises(KernelParamError) as info:
            sample(logits, **params(**{"temperature": 1.0, name: value}))
        assert info.value.argument == name and name in str(info.value)
    assert sample(logits, **params(temperature=1.0, seed=2**64 - 1, step=2**64 - 1)).shape == (1,)
    with pytest.raises(KernelParamError, match="step"):
        sample_draws(logits, n_draws=2, **params(temperature=1.0, step=2**64 - 1))


def test_worker_4400_sampling_rejects_bad_dimensions(device: str) -> None:
    logits = torch.randn(10, device=device)
    cases = [
        (lambda: sample(logits[None], **params()), "logits"),
        (lambda: sample(torch.randn(0, device=device), **params()), "logits"),
        (lambda: sample(logits.to(torch.int32), **params()), "logits"),
        (lambda: sample(torch.randn(10, 2, device=device)[:, 0], **params()), "logits"),
        (lambda: sample(logits, **params(repetition_penalty=1.1, penalty_ids=torch.tensor([1.0], device=device))), "penalty_ids"),
        (lambda: sample(logits, **params(repetition_penalty=1.1, penalty_ids=torch.zeros(2, 2, dtype=torch.int64, device=device))), "penalty_ids"),
        (lambda: sample(logits, **params(repetition_penalty=1.1, penalty_ids=torch.zeros(2, dtype=torch.int64, device="meta"))), "penalty_ids"),
        (lambda: sample([0.0, 1.0], **params()), "logits"),  # type: ignore[arg-type]
        (lambda: sample_draws(logits, n_draws=0, **params()), "n_draws"),
    ]
    for call, arg in cases:
        with pytest.raises(KernelDimensionError) as info:
            call()
        assert info.value.kernel == "sample" and info.value.argument == arg, str(info.value)


@pytest.mark.gpu
def test_worker_4700_sampling_full_vocab_gpu(gen: torch.Generator, device: str) -> None:
    """Qwen-sized vocabulary: greedy, filtered draws only from survivors, and determinism on the GPU."""
    vocab = 151936
    logits = (torch.randn(vocab, generator=gen) * 3).to(device=device, dtype=torch.bfloat16)
    assert int(sample(logits, **params())) == int(torch.argmax(logits.float()))
    p = params(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=fresh_seed(gen))
    draws = sample_draws(logits, n_draws=4096, **p)
    probs = filtered_probs_reference(logits.cpu(), **{k: v for k, v in p.items() if k not in ("seed", "step")})
    assert bool((probs[draws.cpu()] > 0).all())
    assert torch.equal(draws, sample_draws(logits, n_draws=4096, **p))
    for k in ("top_k", "top_p"):
        full = params(temperature=0.8, seed=fresh_seed(gen), **{k: 40 if k == "top_k" else 0.5})
        assert torch.equal(sample(logits, **full), sample(logits, **full))
