"""Token sampling on the device: penalty, temperature, top-k / top-p / min-p, Gumbel-max draw.

The pipeline (HF/llama.cpp semantics, in this order):

1. ``_prepare_kernel``: ``s = logits / T`` in fp32 (``T = 1`` for greedy);
   ``_penalty_kernel`` then rewrites the ids in ``penalty_ids``: positive
   logits divided by the penalty, negative multiplied (each id once, however
   often it repeats: every duplicate writes the same value).
2. Thresholds, only for the filters that are on: ``torch.topk`` (top-k) or
   ``torch.sort`` (top-p without top-k) give the candidates sorted on the
   device (both deterministic); ``_threshold_kernel`` (one program, fixed
   block order) turns them into one fp32 cut-off: the k-th value, the value
   of the last token whose preceding mass is < top_p, and
   ``max + ln(min_p)`` (min-p: ``p < min_p * p_max`` iff ``s < s_max + ln min_p``).
   Tokens tied with a cut-off value are kept.
3. ``_draw_kernel`` + ``_argmax_kernel``: two-stage argmax of
   ``s + Gumbel(u)`` over the tokens with ``s >= cut-off`` (plain ``s`` for
   greedy), ties to the lowest index. ``u`` comes from Philox-4x32-10 keyed
   by the full 64-bit seed, counter ``(token, step_lo, step_hi, tag)``: the
   same (seed, step, logits) always gives the same token, every step draws
   fresh noise, and nothing crosses to the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import validate as v

_BLOCK = 1024
_REDUCE_BLOCK = 128
_TAG = tl.constexpr(0x534D504C)  # "SMPL": keeps this stream apart from any other use of the seed
_U64 = 2**64


@triton.jit
def _prepare_kernel(logits_ptr, work_ptr, n_vocab, temperature, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_vocab
    s = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(work_ptr + offs, s / temperature, mask=mask)


@triton.jit
def _penalty_kernel(logits_ptr, ids_ptr, n_ids, work_ptr, n_vocab, penalty, temperature, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_ids
    ids = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int64)
    # Ids outside the vocabulary are ignored: memory-safe without a host-side scan.
    mask = mask & (ids >= 0) & (ids < n_vocab)
    s = tl.load(logits_ptr + ids, mask=mask, other=0.0).to(tl.float32)
    s = tl.where(s > 0, s / penalty, s * penalty)
    tl.store(work_ptr + ids, s / temperature, mask=mask)


@triton.jit
def _threshold_kernel(
    vals_ptr, n, top_p, log_min_p, out_ptr,
    USE_TOPK: tl.constexpr, USE_TOPP: tl.constexpr, USE_MINP: tl.constexpr, BLOCK: tl.constexpr,
):
    s_max = tl.load(vals_ptr)
    thr = -float("inf")
    if USE_TOPK:
        thr = tl.load(vals_ptr + n - 1)
    if USE_TOPP:
        offs0 = tl.arange(0, BLOCK)
        z = 0.0
        for start in range(0, n, BLOCK):
            x = tl.load(vals_ptr + start + offs0, mask=start + offs0 < n, other=-float("inf"))
            z += tl.sum(tl.exp(x - s_max), axis=0)
        limit = top_p * z
        carry = 0.0
        kept = 0
        for start in range(0, n, BLOCK):
            mask = start + offs0 < n
            p = tl.exp(tl.load(vals_ptr + start + offs0, mask=mask, other=-float("inf")) - s_max)
            before = carry + tl.cumsum(p, axis=0) - p
            kept += tl.sum((mask & (before < limit)).to(tl.int32), axis=0)
            carry += tl.sum(p, axis=0)
        kept = tl.maximum(kept, 1)
        thr = tl.maximum(thr, tl.load(vals_ptr + kept - 1))
    if USE_MINP:
        thr = tl.maximum(thr, s_max + log_min_p)
    tl.store(out_ptr, thr)


# Seeds and steps must not be specialised: 0/1 would become constexprs and each
# new divisibility class would recompile.
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_lo", "step_hi"])
def _draw_kernel(
    work_ptr, thr_ptr, part_val_ptr, part_idx_ptr, n_vocab, n_blocks, n_draws,
    seed_lo, seed_hi, step_lo, step_hi,
    NOISE: tl.constexpr, FILTER: tl.constexpr, BLOCK: tl.constexpr, DRAWS: tl.constexpr,
):
    blk = tl.program_id(0)
    draws = tl.program_id(1) * DRAWS + tl.arange(0, DRAWS)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_vocab
    s = tl.load(work_ptr + offs, mask=mask, other=-float("inf"))
    if FILTER:
        mask = mask & (s >= tl.load(thr_ptr))
    score = tl.broadcast_to(s[None, :], (DRAWS, BLOCK))
    if NOISE:
        c0 = tl.broadcast_to(offs.to(tl.uint32)[None, :], (DRAWS, BLOCK))
        zero = c0 * 0
        base = (step_hi.to(tl.uint64) << 32) | step_lo.to(tl.uint32).to(tl.uint64)
        step = base + draws.to(tl.uint64)[:, None]
        seed = (seed_hi.to(tl.uint64) << 32) | seed_lo.to(tl.uint32).to(tl.uint64)
        r, _, _, _ = tl.philox(seed, c0, zero + step.to(tl.uint32), zero + (step >> 32).to(tl.uint32), zero + _TAG)
        # 23 random bits: (k + 0.5) / 2^23 is exact in fp32 and strictly inside (0, 1).
        u = ((r >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        score = score - tl.log(-tl.log(u))
    score = tl.where(mask[None, :], score, -float("inf"))
    best = tl.argmax(score, axis=1)  # ties: lowest index
    d_mask = draws < n_draws
    tl.store(part_val_ptr + draws * n_blocks + blk, tl.max(score, axis=1), mask=d_mask)
    tl.store(part_idx_ptr + draws * n_blocks + blk, blk * BLOCK + best, mask=d_mask)


@triton.jit
def _argmax_kernel(part_val_ptr, part_idx_ptr, out_ptr, n_blocks, n_draws, BLOCK: tl.constexpr, DRAWS: tl.constexpr):
    draws = tl.program_id(0) * DRAWS + tl.arange(0, DRAWS)
    d_mask = draws < n_draws
    offs0 = tl.arange(0, BLOCK)
    best_val = tl.full([DRAWS], -float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([DRAWS], dtype=tl.int32)
    # Blocks in index order and strict ">" keep the lowest index on ties.
    for start in range(0, n_blocks, BLOCK):
        offs = start + offs0
        m = d_mask[:, None] & (offs < n_blocks)[None, :]
        rows = draws[:, None] * n_blocks + offs[None, :]
        vals = tl.load(part_val_ptr + rows, mask=m, other=-float("inf"))
        j = tl.argmax(vals, axis=1)
        val = tl.max(vals, axis=1)
        idx = tl.load(part_idx_ptr + draws * n_blocks + start + j, mask=d_mask, other=0)
        take = val > best_val
        best_idx = tl.where(take, idx, best_idx)
        best_val = tl.where(take, val, best_val)
    tl.store(out_ptr + draws, best_idx.to(tl.int64), mask=d_mask)


def _check_params(
    temperature: object, top_k: object, top_p: object, min_p: object, repetition_penalty: object, seed: object, step: object
) -> tuple[float, int, float, float, float, int, int]:
    kernel = "sample"
    t = v.finite_float(kernel, "temperature", temperature)
    if not 0.0 <= t <= 2.0:
        v.fail_param(kernel, "temperature", f"must be in [0, 2], got {t}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        v.fail_param(kernel, "top_k", f"must be an int >= 0 (0 = off), got {top_k!r}")
    p = v.finite_float(kernel, "top_p", top_p)
    if not 0.0 < p <= 1.0:
        v.fail_param(kernel, "top_p", f"must be in (0, 1], got {p}")
    mp = v.finite_float(kernel, "min_p", min_p)
    if not 0.0 <= mp < 1.0:
        v.fail_param(kernel, "min_p", f"must be in [0, 1), got {mp}")
    rp = v.finite_float(kernel, "repetition_penalty", repetition_penalty)
    if rp <= 0.0:
        v.fail_param(kernel, "repetition_penalty", f"must be > 0, got {rp}")
    for name, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
            v.fail_param(kernel, name, f"must be an int in [0, 2^64), got {value!r}")
    return t, top_k, p, mp, rp, seed, step  # type: ignore[return-value]


def _check_tensors(logits: object, penalty_ids: object) -> tuple[torch.Tensor, torch.Tensor | None, torch.device]:
    kernel = "sample"
    logits = v.tensor(kernel, "logits", logits)
    v.rank(kernel, "logits", logits, 1)
    v.positive_dims(kernel, "logits", logits)
    v.dtype(kernel, "logits", logits, v.FLOAT_DTYPES)
    v.contiguous(kernel, "logits", logits)
    v.int32_addressable(kernel, "logits", logits)
    named = {"logits": logits}
    if penalty_ids is not None:
        penalty_ids = v.tensor(kernel, "penalty_ids", penalty_ids)
        v.rank(kernel, "penalty_ids", penalty_ids, 1)
        v.dtype(kernel, "penalty_ids", penalty_ids, v.INDEX_DTYPES)
        v.contiguous(kernel, "penalty_ids", penalty_ids)
        v.int32_addressable(kernel, "penalty_ids", penalty_ids)
        named["penalty_ids"] = penalty_ids
    device = v.same_device(kernel, named)
    return logits, penalty_ids, device


def _split64(x: int) -> tuple[int, int]:
    return x & 0xFFFFFFFF, x >> 32


def sample_draws(
    logits: torch.Tensor,
    *,
    n_draws: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    penalty_ids: torch.Tensor | None,
    seed: int,
    step: int,
) -> torch.Tensor:
    """The tokens ``sample`` returns for steps ``step .. step + n_draws - 1`` on the same logits, in one launch.

    Returns int64 [n_draws] on the device. Lets tests and benchmarks draw
    thousands of samples without thousands of launches.
    """
    t, top_k, top_p, min_p, rp, seed, step = _check_params(temperature, top_k, top_p, min_p, repetition_penalty, seed, step)
    logits, penalty_ids, device = _check_tensors(logits, penalty_ids)
    n_draws = v.positive_int("sample", "n_draws", n_draws)
    if step + n_draws > _U64:
        v.fail_param("sample", "step", "step + n_draws must stay below 2^64")
    greedy = t == 0.0
    t_div = 1.0 if greedy else t
    n_vocab = logits.shape[0]
    # Small vocabularies with many draws (tests) batch draws per program instead of padding tokens.
    block = min(_BLOCK, max(16, triton.next_power_of_2(n_vocab)))
    draws_per_prog = min(triton.next_power_of_2(n_draws), max(1, _BLOCK // block))
    n_blocks = triton.cdiv(n_vocab, block)
    v.check(n_draws * n_blocks <= v.INT32_MAX, "sample", "n_draws", "n_draws * vocabulary blocks must fit int32")
    v.check(triton.cdiv(n_draws, draws_per_prog) <= 65535, "sample", "n_draws", "too many draws for one launch (grid.y <= 65535)")
    work = torch.empty(n_vocab, dtype=torch.float32, device=device)
    thr = torch.empty(1, dtype=torch.float32, device=device)
    part_val = torch.empty((n_draws, n_blocks), dtype=torch.float32, device=device)
    part_idx = torch.empty((n_draws, n_blocks), dtype=torch.int32, device=device)
    tokens = torch.empty(n_draws, dtype=torch.int64, device=device)
    use_topk = not greedy and 0 < top_k < n_vocab
    use_topp = not greedy and top_p < 1.0
    use_minp = not greedy and min_p > 0.0
    seed_lo, seed_hi = _split64(seed)
    step_lo, step_hi = _split64(step)
    try:
        _prepare_kernel[(n_blocks,)](logits, work, n_vocab, t_div, BLOCK=block)
        if penalty_ids is not None and penalty_ids.numel() > 0 and rp != 1.0:
            n_ids = penalty_ids.numel()
            _penalty_kernel[(triton.cdiv(n_ids, _BLOCK),)](logits, penalty_ids, n_ids, work, n_vocab, rp, t_div, BLOCK=_BLOCK)
        if use_topk or use_topp or use_minp:
            if use_topk:
                vals = torch.topk(work, top_k, sorted=True).values
            elif use_topp:
                vals = torch.sort(work, descending=True).values
            else:
                vals = torch.amax(work, dim=0, keepdim=True)
            _threshold_kernel[(1,)](
                vals, vals.numel(), top_p, math.log(min_p) if use_minp else 0.0, thr,
                USE_TOPK=use_topk, USE_TOPP=use_topp, USE_MINP=use_minp, BLOCK=_BLOCK,
            )
        _draw_kernel[(n_blocks, triton.cdiv(n_draws, draws_per_prog))](
            work, thr, part_val, part_idx, n_vocab, n_blocks, n_draws, seed_lo, seed_hi, step_lo, step_hi,
            NOISE=not greedy, FILTER=use_topk or use_topp or use_minp, BLOCK=block, DRAWS=draws_per_prog,
        )
        _argmax_kernel[(triton.cdiv(n_draws, draws_per_prog),)](
            part_val, part_idx, tokens, n_blocks, n_draws,
            BLOCK=max(16, _REDUCE_BLOCK // draws_per_prog), DRAWS=draws_per_prog,
        )
    except Exception as exc:  # noqa: BLE001
        raise v.launch_error("sample", device, exc) from exc
    return tokens


def sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    penalty_ids: torch.Tensor | None,
    seed: int,
    step: int,
) -> torch.Tensor:
    """Pick the next token from ``logits`` [V]; int64 [1] on the device (greedy when temperature == 0).

    Greedy also applies the repetition penalty (as HF and llama.cpp do) and
    ignores top-k/top-p/min-p, which can never remove the argmax.
    """
    return sample_draws(
        logits, n_draws=1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, penalty_ids=penalty_ids, seed=seed, step=step,
    )


def filtered_probs_reference(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, min_p: float,
    repetition_penalty: float, penalty_ids: torch.Tensor | None,
) -> torch.Tensor:
    """The float64 distribution ``sample`` draws from (temperature > 0): the tests' ground truth."""
    s = logits.to(torch.float64).clone()
    if penalty_ids is not None and penalty_ids.numel() and repetition_penalty != 1.0:
        ids = torch.unique(penalty_ids.to(torch.int64))
        ids = ids[(ids >= 0) & (ids < s.numel())]
        picked = s[ids]
        s[ids] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
    s = s / temperature
    keep = torch.ones_like(s, dtype=torch.bool)
    if 0 < top_k < s.numel():
        keep &= s >= torch.topk(s, top_k).values[-1]
    if top_p < 1.0:
        masked = torch.where(keep, s, torch.tensor(float("-inf"), dtype=s.dtype))
        sorted_s = torch.sort(masked, descending=True).values
        p = torch.softmax(sorted_s, dim=0)
        before = torch.cumsum(p, dim=0) - p
        kept = max(1, int((before < top_p).sum()))
        keep &= s >= sorted_s[kept - 1]
    if min_p > 0.0:
        keep &= s >= s.max() + math.log(min_p)
    s = torch.where(keep, s, torch.tensor(float("-inf"), dtype=s.dtype))
    return torch.softmax(s, dim=0)
