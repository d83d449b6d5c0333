"""The runner's per-row sampling loop as it was before the batched sampler (commit 8886ee4, verbatim
apart from the free-function form): the oracle the batched sampler must match token for token.

Kept frozen on purpose: a seeded job's stream is a contract (SPEC 4710), so the new path is
held to the old code itself, not to a rewrite of it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from worker_orcd.batching.step import Sampled, SampleSpec
from worker_orcd.engine import ops
from worker_orcd.engine.events import MAX_LOGPROBS, SamplingParams


def _simple_greedy(p: SamplingParams) -> bool:
    return (
        p.temperature == 0.0
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and p.constraint is None
        and not p.logprobs
        and not p.top_logprobs
    )


def _mask_from_bitmask(words: object, vocab: int, device: torch.device) -> torch.Tensor:
    """Packed int32 bitmask (bit t%32 of word t//32) -> bool [vocab]; ids past the mask are disallowed."""
    w = np.asarray(words, dtype=np.int32).reshape(-1).view(np.uint32)
    bits = ((w[:, None] >> np.arange(32, dtype=np.uint32)[None, :]) & 1).astype(bool).reshape(-1)
    out = np.zeros(vocab, dtype=bool)
    n = min(vocab, bits.size)
    out[:n] = bits[:n]
    return torch.from_numpy(out).to(device)


def legacy_sample(logits: torch.Tensor, specs: list[SampleSpec], device: torch.device) -> list[Sampled]:
    if all(_simple_greedy(s.params) for s in specs):
        # argmax picks the lowest index on ties, as the sampling kernel's greedy path does
        ids = torch.argmax(logits, dim=-1).tolist()
        return [Sampled(int(t)) for t in ids]
    picked: list[torch.Tensor] = []
    for i, spec in enumerate(specs):
        p = spec.params
        raw = logits[i]
        if _simple_greedy(p):
            picked.append(torch.argmax(raw).reshape(1))
            continue
        row = raw
        if (p.presence_penalty or p.frequency_penalty) and spec.generated:
            gen = torch.tensor(spec.generated, dtype=torch.int64, device=device)
            counts = torch.bincount(gen, minlength=row.numel())[: row.numel()].to(torch.float32)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(torch.float32)
        if p.constraint is not None:
            row = row.masked_fill(~_mask_from_bitmask(p.constraint.allowed(), row.numel(), device), -math.inf)
        penalty = None
        if p.repetition_penalty != 1.0 and spec.history:
            penalty = torch.tensor(spec.history, dtype=torch.int64, device=device)
        picked.append(
            ops.sample(
                row.contiguous(), temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                repetition_penalty=p.repetition_penalty, penalty_ids=penalty, seed=p.seed, step=spec.step,
            ).reshape(1)
        )
    ids = torch.cat(picked).tolist()
    out: list[Sampled] = []
    for i, (spec, tok) in enumerate(zip(specs, ids, strict=True)):
        p = spec.params
        if p.constraint is not None:
            p.constraint.accept(int(tok))
        if p.logprobs or p.top_logprobs:
            lp = torch.log_softmax(logits[i].float(), dim=-1)
            chosen = float(lp[tok])
            top: tuple[tuple[int, float], ...] = ()
            k = min(p.top_logprobs, MAX_LOGPROBS)
            if k:
                vals, idx = torch.topk(lp, k)
                top = tuple(zip(idx.tolist(), vals.tolist(), strict=True))
            out.append(Sampled(int(tok), chosen, top))
        else:
            out.append(Sampled(int(tok)))
    return out


def legacy_row(logits_row: torch.Tensor, spec: SampleSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``legacy_sample`` hands ``ops.sample`` for a non-simple row (its lines, unchanged): the
    penalised, masked row and the penalty ids. Lets tests compare the kernels' intermediate stages."""
    p = spec.params
    row = logits_row
    if (p.presence_penalty or p.frequency_penalty) and spec.generated:
        gen = torch.tensor(spec.generated, dtype=torch.int64, device=device)
        counts = torch.bincount(gen, minlength=row.numel())[: row.numel()].to(torch.float32)
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(torch.float32)
    if p.constraint is not None:
        row = row.masked_fill(~_mask_from_bitmask(p.constraint.allowed(), row.numel(), device), -math.inf)
    penalty = None
    if p.repetition_penalty != 1.0 and spec.history:
        penalty = torch.tensor(spec.history, dtype=torch.int64, device=device)
    return row.contiguous(), penalty
