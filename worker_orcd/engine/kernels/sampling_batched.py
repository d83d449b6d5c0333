"""Batched sampling: a whole step's rows through penalties, cut-offs and the Gumbel-max draw in a fixed set of launches.

Row r's token is bit for bit what the per-row path (``ops.sample_each``: the runner's torch
presence/frequency penalty and grammar mask, then ``sampling.sample``) draws for that row
alone, so a seeded job's stream (SPEC 4710) does not depend on what else is in the batch or
where. Each stage repeats the per-row kernels' arithmetic, in their order, with their
instructions:

1. ``_scatter_info_kernel`` (only when some row has penalty ids): one int32 word per (row,
   token) of those rows; bits 0-29 count the token in the row's generated ids, bit 30 marks
   it for the repetition penalty. Integer atomics: the words do not depend on their order.
2. ``_prepare_rows_kernel`` (vocabulary blocks x rows): ``x - f*count`` then ``- p*[count > 0]``
   (the runner's torch ops, each rounded: compiled without fp fusion, so no FMA joins them),
   grammar bit 0 -> -inf, the repetition penalty, ``/ T``: what ``sampling._prepare_kernel`` and
   ``_penalty_kernel`` write for the row.
3. Cut-offs for the rows with a filter, in two groups: ``torch.topk`` to the widest k (rows
   with top-k, or min-p alone) and ``torch.sort`` (top-p without top-k). The first k values of
   a top-k_max are the top-k values, so each row sees exactly the candidates it sees alone.
   ``_cutoff_rows_kernel`` is ``sampling._threshold_kernel`` with the row's flags read at run
   time: one program per row, the same 1024-wide blocks, and a row base aligned to 16 floats,
   so Triton lays its loads out as for a lone row and the top-p sums round the same.
4. ``_draw_rows_kernel`` (vocabulary blocks x rows) is ``sampling._draw_kernel`` for one draw
   keyed by the row's seed and step; ``_argmax_rows_kernel`` reduces the block maxima as
   ``sampling._argmax_kernel`` does, ties to the lowest id.

Launches per step, whatever R is: one host->device copy of every parameter, [memset +
scatter], prepare, per filter group [gather +] topk or sort + cut-off, draw, argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ..sample_rows import KERNEL, SampleRows, check_logits, check_rows, ln_min_p
from . import validate as v
from .sampling import _TAG

_BLOCK = 1024  # the cut-off blocks: must equal sampling._threshold_kernel's (its sums' rounding)
_FIELDS = tl.constexpr(16)  # int32 words per row in the packed parameter block
_ALIGN = 16  # region starts and cut-off row strides, in elements: 64-byte aligned rows
# Word indices of a row's parameters (float ones hold their fp32 bits).
_F_T = tl.constexpr(0)
_F_TOP_P = tl.constexpr(1)
_F_LOG_MIN_P = tl.constexpr(2)
_F_REP = tl.constexpr(3)
_F_PRESENCE = tl.constexpr(4)
_F_FREQUENCY = tl.constexpr(5)
_F_N = tl.constexpr(6)  # candidates the cut-off reads: top_k, V (sorted row) or 1 (max only)
_F_FLAGS = tl.constexpr(7)
_F_SEED_LO = tl.constexpr(8)
_F_SEED_HI = tl.constexpr(9)
_F_STEP_LO = tl.constexpr(10)
_F_STEP_HI = tl.constexpr(11)
_F_INFO_ROW = tl.constexpr(12)  # row of the info buffer, -1: none
_F_MASK_ROW = tl.constexpr(13)  # row of the bitmask block, -1: none
# Row flags.
_NOISE = tl.constexpr(1)
_FILTER = tl.constexpr(2)
_TOPK = tl.constexpr(4)
_TOPP = tl.constexpr(8)
_MINP = tl.constexpr(16)
_PF = tl.constexpr(32)
_REP = tl.constexpr(64)
_MASK = tl.constexpr(128)
_PEN_BIT = tl.constexpr(1 << 30)
_COUNT_BITS = tl.constexpr((1 << 30) - 1)


# The id counts change every step: unspecialised, so no new value class compiles mid-serving.
@triton.jit(do_not_specialize=["n_pen", "n_pos"])
def _scatter_info_kernel(pos_ptr, n_pen, n_pos, info_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < n_pos
    pos = tl.load(pos_ptr + i, mask=live, other=0)
    tl.atomic_or(info_ptr + pos, tl.full([BLOCK], _PEN_BIT, tl.int32), mask=live & (i < n_pen), sem="relaxed")
    tl.atomic_add(info_ptr + pos, tl.full([BLOCK], 1, tl.int32), mask=live & (i >= n_pen), sem="relaxed")


# Launched with enable_fp_fusion=False: ``x - f * count`` must round the product first, as torch does.
# The row's flags pick the steps at run time: one compiled variant serves every mix of rows.
@triton.jit
def _prepare_rows_kernel(logits_ptr, stride_l, params_ptr, info_ptr, masks_ptr, n_words, work_ptr, n_vocab, BLOCK: tl.constexpr):
    r = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_vocab
    prm = params_ptr + r * _FIELDS
    flags = tl.load(prm + _F_FLAGS)
    x = tl.load(logits_ptr + r * stride_l + offs, mask=inside, other=0.0).to(tl.float32)
    info = tl.zeros([BLOCK], dtype=tl.int32)
    if (flags & (_PF | _REP)) != 0:
        info = tl.load(info_ptr + tl.load(prm + _F_INFO_ROW) * n_vocab + offs, mask=inside, other=0)
    if (flags & _PF) != 0:
        count = (info & _COUNT_BITS).to(tl.float32)
        x = x - tl.load(prm + _F_FREQUENCY).to(tl.float32, bitcast=True) * count
        x = x - tl.load(prm + _F_PRESENCE).to(tl.float32, bitcast=True) * (count > 0).to(tl.float32)
    if (flags & _MASK) != 0:
        word = tl.load(masks_ptr + tl.load(prm + _F_MASK_ROW) * n_words + offs // 32, mask=inside, other=0)
        x = tl.where(((word >> (offs % 32)) & 1) != 0, x, -float("inf"))
    if (flags & _REP) != 0:
        penalty = tl.load(prm + _F_REP).to(tl.float32, bitcast=True)
        x = tl.where((info & _PEN_BIT) != 0, tl.where(x > 0, x / penalty, x * penalty), x)
    temperature = tl.load(prm + _F_T).to(tl.float32, bitcast=True)
    tl.store(work_ptr + r * n_vocab + offs, x / temperature, mask=inside)


@triton.jit
def _cutoff_rows_kernel(vals_ptr, stride_v, rows_ptr, params_ptr, thr_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    r = tl.load(rows_ptr + i)
    prm = params_ptr + r * _FIELDS
    flags = tl.load(prm + _F_FLAGS)
    n = tl.load(prm + _F_N)
    top_p = tl.load(prm + _F_TOP_P).to(tl.float32, bitcast=True)
    log_min_p = tl.load(prm + _F_LOG_MIN_P).to(tl.float32, bitcast=True)
    vals = vals_ptr + i * stride_v
    s_max = tl.load(vals)
    thr = tl.full([], -float("inf"), tl.float32)
    # From here on: sampling._threshold_kernel's body, line for line.
    if (flags & _TOPK) != 0:
        thr = tl.load(vals + n - 1)
    if (flags & _TOPP) != 0:
        offs0 = tl.arange(0, BLOCK)
        z = 0.0
        for start in range(0, n, BLOCK):
            x = tl.load(vals + start + offs0, mask=start + offs0 < n, other=-float("inf"))
            z += tl.sum(tl.exp(x - s_max), axis=0)
        limit = top_p * z
        carry = 0.0
        kept = 0
        for start in range(0, n, BLOCK):
            mask = start + offs0 < n
            p = tl.exp(tl.load(vals + start + offs0, mask=mask, other=-float("inf")) - s_max)
            before = carry + tl.cumsum(p, axis=0) - p
            kept += tl.sum((mask & (before < limit)).to(tl.int32), axis=0)
            carry += tl.sum(p, axis=0)
        kept = tl.maximum(kept, 1)
        thr = tl.maximum(thr, tl.load(vals + kept - 1))
    if (flags & _MINP) != 0:
        thr = tl.maximum(thr, s_max + log_min_p)
    tl.store(thr_ptr + r, thr)


@triton.jit
def _draw_rows_kernel(work_ptr, thr_ptr, params_ptr, part_val_ptr, part_idx_ptr, n_vocab, n_blocks, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    r = tl.program_id(1)
    prm = params_ptr + r * _FIELDS
    flags = tl.load(prm + _F_FLAGS)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_vocab
    s = tl.load(work_ptr + r * n_vocab + offs, mask=mask, other=-float("inf"))
    if (flags & _FILTER) != 0:
        mask = mask & (s >= tl.load(thr_ptr + r))
    score = s
    # sampling._draw_kernel's noise for draw 0, with the row's seed and step
    if (flags & _NOISE) != 0:
        seed_lo = tl.load(prm + _F_SEED_LO)
        seed_hi = tl.load(prm + _F_SEED_HI)
        step_lo = tl.load(prm + _F_STEP_LO)
        step_hi = tl.load(prm + _F_STEP_HI)
        c0 = offs.to(tl.uint32)
        zero = c0 * 0
        step = (step_hi.to(tl.uint64) << 32) | step_lo.to(tl.uint32).to(tl.uint64)
        seed = (seed_hi.to(tl.uint64) << 32) | seed_lo.to(tl.uint32).to(tl.uint64)
        rnd, _, _, _ = tl.philox(seed, c0, zero + step.to(tl.uint32), zero + (step >> 32).to(tl.uint32), zero + _TAG)
        u = ((rnd >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        score = s - tl.log(-tl.log(u))
    score = tl.where(mask, score, -float("inf"))
    tl.store(part_val_ptr + r * n_blocks + blk, tl.max(score, axis=0))
    tl.store(part_idx_ptr + r * n_blocks + blk, blk * BLOCK + tl.argmax(score, axis=0))


@triton.jit
def _argmax_rows_kernel(part_val_ptr, part_idx_ptr, out_ptr, n_blocks, BLOCK: tl.constexpr):
    """sampling._argmax_kernel for one draw per row; the row is the program, so R is no argument
    (a changing R would be a new specialisation to compile)."""
    r = tl.program_id(0)
    offs0 = tl.arange(0, BLOCK)
    best_val = -float("inf")
    best_idx = 0
    # Blocks in index order and strict ">" keep the lowest index on ties.
    for start in range(0, n_blocks, BLOCK):
        offs = start + offs0
        vals = tl.load(part_val_ptr + r * n_blocks + offs, mask=offs < n_blocks, other=-float("inf"))
        j = tl.argmax(vals, axis=0)
        val = tl.max(vals, axis=0)
        idx = tl.load(part_idx_ptr + r * n_blocks + start + j)
        take = val > best_val
        best_idx = tl.where(take, idx, best_idx)
        best_val = tl.where(take, val, best_val)
    tl.store(out_ptr + r, best_idx.to(tl.int64))


def _check_logits(logits: object) -> tuple[torch.Tensor, torch.device]:
    check_logits(logits)
    assert isinstance(logits, torch.Tensor)
    v.int32_addressable(KERNEL, "logits", logits)
    device = v.same_device(KERNEL, {"logits": logits})
    n_rows, vocab = logits.shape
    v.check(n_rows <= 65535, KERNEL, "logits", f"at most 65535 rows (grid.y), got {n_rows}")
    v.check(n_rows * vocab <= v.INT32_MAX, KERNEL, "logits", "rows x vocabulary must fit int32")
    return logits, device


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


def _f32_bits(x: np.ndarray) -> np.ndarray:
    """fp32 bits of float64 values, rounded to nearest as the per-row launcher passes a Python float."""
    return x.astype(np.float32).view(np.int32)


def _split64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = (x & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
    hi = (x >> np.uint64(32)).astype(np.uint32).view(np.int32)
    return lo, hi


@dataclass
class _Group:
    """Filter rows that share one torch.topk (full=False, width k_max) or torch.sort (full=True)."""

    rows: np.ndarray  # row indices, increasing
    offset: int  # where they sit in the packed buffer
    width: int  # candidates per row (top-k_max, or V)
    full: bool


@dataclass
class _Packed:
    """The packed int32 host buffer and what the launches need to know about it."""

    host: torch.Tensor
    n_pen: int
    n_pos: int
    pos_offset: int
    n_info: int
    n_masks: int
    masks_offset: int
    groups: list[_Group]


def _pack(rows: SampleRows, n_rows: int, vocab: int, pin: bool) -> _Packed:
    """Every row's parameters, the info scatter positions, the filter groups and the bitmasks in one int32 buffer."""
    R, V = n_rows, vocab
    t = rows.temperature.numpy()
    top_k = rows.top_k.numpy()
    top_p, min_p = rows.top_p.numpy(), rows.min_p.numpy()
    rep = rows.repetition_penalty.numpy()
    presence, frequency = rows.presence_penalty.numpy(), rows.frequency_penalty.numpy()
    greedy = t == 0.0
    use_topk = ~greedy & (top_k > 0) & (top_k < V)
    use_topp = ~greedy & (top_p < 1.0)
    use_minp = ~greedy & (min_p > 0.0)
    filt = use_topk | use_topp | use_minp
    pen_len = np.diff(rows.penalty_offsets.numpy())
    gen_len = np.diff(rows.generated_offsets.numpy())
    has_rep = (rep != 1.0) & (pen_len > 0)
    has_pf = ((presence != 0.0) | (frequency != 0.0)) & (gen_len > 0)
    has_mask = rows.has_mask.numpy() if rows.has_mask is not None else np.zeros(R, dtype=bool)
    has_info = has_rep | has_pf
    info_row = np.where(has_info, np.cumsum(has_info) - 1, -1)
    mask_row = np.where(has_mask, np.cumsum(has_mask) - 1, -1)

    def positions(ids: torch.Tensor, lengths: np.ndarray, on: np.ndarray) -> np.ndarray:
        """info-buffer offsets of the ids of the rows that are ``on``; ids outside [0, V) are dropped
        (the penalty kernel ignores them; token ids never are)."""
        owner = np.repeat(np.arange(R), lengths)
        a = ids.numpy().astype(np.int64)
        keep = on[owner] & (a >= 0) & (a < V)
        return info_row[owner[keep]] * V + a[keep]

    pen_pos = positions(rows.penalty_ids, pen_len, has_rep)
    gen_pos = positions(rows.generated_ids, gen_len, has_pf)
    sort_rows = np.flatnonzero(filt & use_topp & ~use_topk)
    topk_rows = np.flatnonzero(filt & ~(use_topp & ~use_topk))
    n = np.where(use_topk, top_k, np.where(use_topp, V, 1))

    n_pos = pen_pos.size + gen_pos.size
    n_masks = int(has_mask.sum())
    n_words = -(-V // 32)
    pos_offset = _ceil(R * _FIELDS.value, _ALIGN)
    cursor = _ceil(pos_offset + n_pos, _ALIGN)
    groups: list[_Group] = []
    for members, full in ((topk_rows, False), (sort_rows, True)):
        if members.size:
            width = V if full else min(V, _ceil(int(n[members].max()), _ALIGN))
            groups.append(_Group(members, cursor, width, full))
            cursor = _ceil(cursor + members.size, _ALIGN)
    masks_offset = cursor
    total = masks_offset + n_masks * n_words

    host = torch.empty(total, dtype=torch.int32, pin_memory=pin)
    buf = host.numpy()
    block = buf[: R * _FIELDS.value].reshape(R, _FIELDS.value)
    block[:] = 0
    block[:, _F_T.value] = _f32_bits(np.where(greedy, 1.0, t))
    block[:, _F_TOP_P.value] = _f32_bits(top_p)
    block[:, _F_LOG_MIN_P.value] = _f32_bits(np.where(use_minp, ln_min_p(min_p), 0.0))
    block[:, _F_REP.value] = _f32_bits(rep)
    block[:, _F_PRESENCE.value] = _f32_bits(presence)
    block[:, _F_FREQUENCY.value] = _f32_bits(frequency)
    block[:, _F_N.value] = n
    block[:, _F_FLAGS.value] = (
        np.where(~greedy, _NOISE.value, 0) | np.where(filt, _FILTER.value, 0) | np.where(use_topk, _TOPK.value, 0)
        | np.where(use_topp, _TOPP.value, 0) | np.where(use_minp, _MINP.value, 0) | np.where(has_pf, _PF.value, 0)
        | np.where(has_rep, _REP.value, 0) | np.where(has_mask, _MASK.value, 0)
    )
    block[:, _F_SEED_LO.value], block[:, _F_SEED_HI.value] = _split64(rows.seed.numpy())
    block[:, _F_STEP_LO.value], block[:, _F_STEP_HI.value] = _split64(rows.step.numpy())
    block[:, _F_INFO_ROW.value] = info_row
    block[:, _F_MASK_ROW.value] = mask_row
    buf[pos_offset : pos_offset + pen_pos.size] = pen_pos
    buf[pos_offset + pen_pos.size : pos_offset + n_pos] = gen_pos
    for g in groups:
        buf[g.offset : g.offset + g.rows.size] = g.rows
    if n_masks:
        assert rows.allowed is not None
        buf[masks_offset:total].reshape(n_masks, n_words)[:] = rows.allowed.numpy()[has_mask]
    return _Packed(host, pen_pos.size, n_pos, pos_offset, int(has_info.sum()), n_masks, masks_offset, groups)


@dataclass
class BatchStages:
    """Every stage's device output (tests hold each to the per-row kernels' own)."""

    work: torch.Tensor  # [R, V] fp32: penalised, masked, tempered scores
    thr: torch.Tensor  # [R] fp32 cut-offs (only filter rows written)
    part_val: torch.Tensor  # [R, n_blocks] block maxima of the noisy scores
    part_idx: torch.Tensor  # [R, n_blocks] their ids
    tokens: torch.Tensor  # [R] int64
    block: int  # the draw's vocabulary block


def sample_batch_stages(logits: torch.Tensor, rows: SampleRows) -> BatchStages:
    """``sample_batch`` with every intermediate kept."""
    logits, device = _check_logits(logits)
    R, V = logits.shape
    check_rows(rows, R, V)
    packed = _pack(rows, R, V, pin=device.type == "cuda")
    dev = packed.host.to(device, non_blocking=True) if device.type == "cuda" else packed.host
    params = dev[: R * _FIELDS.value]
    block = min(_BLOCK, max(16, triton.next_power_of_2(V)))
    n_blocks = triton.cdiv(V, block)
    work = torch.empty((R, V), dtype=torch.float32, device=device)
    thr = torch.empty(R, dtype=torch.float32, device=device)
    part_val = torch.empty((R, n_blocks), dtype=torch.float32, device=device)
    part_idx = torch.empty((R, n_blocks), dtype=torch.int32, device=device)
    tokens = torch.empty(R, dtype=torch.int64, device=device)
    n_words = -(-V // 32)
    try:
        info = params  # an int32 stand-in, read only by rows with penalty ids
        if packed.n_info:
            info = torch.zeros((packed.n_info, V), dtype=torch.int32, device=device)
            if packed.n_pos:
                pos = dev[packed.pos_offset : packed.pos_offset + packed.n_pos]
                _scatter_info_kernel[(triton.cdiv(packed.n_pos, _BLOCK),)](pos, packed.n_pen, packed.n_pos, info, BLOCK=_BLOCK)
        masks = dev[packed.masks_offset :] if packed.n_masks else params
        _prepare_rows_kernel[(n_blocks, R)](
            logits, logits.stride(0), params, info, masks, n_words, work, V, BLOCK=block, enable_fp_fusion=False
        )
        for g in packed.groups:
            members = dev[g.offset : g.offset + g.rows.size]
            every = g.rows.size == R  # rows are increasing: all of them, in order
            sub = work if every else work.index_select(0, members)
            if g.full:
                vals = torch.sort(sub, dim=-1, descending=True).values
            else:
                vals = torch.topk(sub, g.width, dim=-1, sorted=True).values
            if vals.stride(0) % _ALIGN:  # odd vocabularies: pad each row to a 64-byte boundary
                padded = torch.empty((vals.shape[0], _ceil(vals.shape[1], _ALIGN)), dtype=vals.dtype, device=device)
                padded[:, : vals.shape[1]] = vals
                vals = padded
            _cutoff_rows_kernel[(g.rows.size,)](vals, vals.stride(0), members, params, thr, BLOCK=_BLOCK)
        _draw_rows_kernel[(n_blocks, R)](work, thr, params, part_val, part_idx, V, n_blocks, BLOCK=block)
        _argmax_rows_kernel[(R,)](part_val, part_idx, tokens, n_blocks, BLOCK=128)
    except Exception as exc:  # noqa: BLE001
        raise v.launch_error(KERNEL, device, exc) from exc
    return BatchStages(work, thr, part_val, part_idx, tokens, block)


def sample_batch(logits: torch.Tensor, rows: SampleRows) -> torch.Tensor:
    """Each row's next token from ``logits`` [R, V] with its own settings: int64 [R] on the device, no host sync."""
    return sample_batch_stages(logits, rows).tokens
