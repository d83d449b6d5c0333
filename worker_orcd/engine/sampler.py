"""A step's sampling on the runner: every row's settings from its SampleSpec, one batched draw,
the logprobs of the rows that ask, and one device->host read for all of it.

The grammar protocol stays on the host: ``constraint.allowed()`` before the draw (the bitmasks
travel to the device with the other parameters, in one copy) and ``constraint.accept(token)``
after it, in row order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..batching.step import Sampled, SampleSpec
from .events import MAX_LOGPROBS, SamplingParams
from . import ops
from .sample_rows import RowParams, SampleRows


def simple_greedy(p: SamplingParams) -> bool:
    """Nothing but argmax: the whole step then needs a single ``torch.argmax``."""
    return (
        p.temperature == 0.0
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and p.constraint is None
        and not p.logprobs
        and not p.top_logprobs
    )


def row_params(spec: SampleSpec) -> RowParams:
    """The row's sampler settings; asks its constraint (if any) for the allowed ids now."""
    p = spec.params
    return RowParams(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, seed=p.seed, step=spec.step,
        penalty_ids=spec.history if p.repetition_penalty != 1.0 else (),
        generated_ids=spec.generated if (p.presence_penalty or p.frequency_penalty) else (),
        allowed=p.constraint.allowed() if p.constraint is not None else None,
    )


def top_logprobs(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of ``lp`` [R, V] and their ids, equal values lowest id first.

    A total order (torch.topk leaves the order of ties open, and it can change with k or the
    batch): each row's alternatives then depend on that row alone. Keys are the fp32 bits made
    monotone, shifted up, plus the id reversed; one int64 topk sorts by both at once.
    """
    b = lp.contiguous().view(torch.int32)
    key = torch.where(b >= 0, b, b ^ 0x7FFFFFFF).to(torch.int64)
    vocab = lp.shape[-1]
    reversed_ids = torch.arange(vocab - 1, -1, -1, dtype=torch.int64, device=lp.device)
    ids = torch.topk((key << 32) + reversed_ids, k, dim=-1).indices
    return lp.gather(1, ids), ids


class ReadStaging:
    """Pinned host buffers the steps' results are copied into, reused in turn: allocating pinned
    memory per step would cost a cudaHostAlloc (which waits for the device) whenever the
    caching allocator has no free block. A slot is reused only once its copy has landed."""

    SLOTS = 4  # the engine loop has at most two steps unread

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.dtype, int], list[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}
        self._next = 0

    def read(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        n = packed.numel()
        size = 1 << max(6, (n - 1).bit_length())
        ring = self._bufs.setdefault((packed.dtype, size), [])
        i = self._next % self.SLOTS
        self._next += 1
        if len(ring) <= i:
            ring.extend((torch.empty(size, dtype=packed.dtype, pin_memory=True), None) for _ in range(i + 1 - len(ring)))
        buf, prev = ring[i]
        if prev is not None:
            prev.synchronize()
        host = buf[:n]
        host.copy_(packed.reshape(-1), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        ring[i] = (buf, event)
        return host, event


class SampledOnDevice:
    """A step's draw, queued: ``ids`` [R] int64 on the device (the next step's PENDING inputs read
    it there); ``result()`` waits for the one device->host copy and decodes it."""

    def __init__(self, ids: torch.Tensor, packed: torch.Tensor, specs: Sequence[SampleSpec],
                 asks: list[int], k_max: int, staging: ReadStaging | None = None) -> None:
        self.ids = ids
        self._specs = specs
        self._asks = asks
        self._k_max = k_max
        self._out: list[Sampled] | None = None
        self._event: torch.cuda.Event | None = None
        if packed.device.type == "cuda":
            self._host, self._event = (staging or ReadStaging()).read(packed)
        else:
            self._host = packed

    def result(self) -> list[Sampled]:
        if self._out is None:
            if self._event is not None:
                self._event.synchronize()
            self._out = self._decode(self._host.tolist())
        return self._out

    def _decode(self, host: list) -> list[Sampled]:  # type: ignore[type-arg]
        specs, asks, k_max = self._specs, self._asks, self._k_max
        n, m = len(specs), len(asks)
        if not asks and all(p.params.constraint is None for p in specs):
            return [Sampled(int(t)) for t in host[:n]]
        chosen = host[n : n + m]
        vals_h = host[n + m : n + m + m * k_max]
        top_h = host[n + m + m * k_max :]
        slot = {row: j for j, row in enumerate(asks)}
        out: list[Sampled] = []
        for i, spec in enumerate(specs):
            p = spec.params
            tok = int(host[i])
            if p.constraint is not None:
                p.constraint.accept(tok)
            j = slot.get(i)
            if j is None:
                out.append(Sampled(tok))
                continue
            k = min(p.top_logprobs, MAX_LOGPROBS)
            base = j * k_max
            top = tuple((int(top_h[base + c]), vals_h[base + c]) for c in range(k))
            out.append(Sampled(tok, chosen[j], top))
        return out


def sample_launch(logits: torch.Tensor, specs: Sequence[SampleSpec],
                  staging: ReadStaging | None = None) -> SampledOnDevice:
    """Row i of ``logits`` [R, V] sampled with ``specs[i]``, queued on the device.

    Logprobs are log_softmax of the raw fp32 logits (before penalties, temperature and
    truncation), as vLLM reports them; alternatives with equal logprobs come lowest id first.
    """
    if all(simple_greedy(s.params) for s in specs):
        # argmax picks the lowest index on ties, as the sampling kernel's greedy path does
        ids = torch.argmax(logits, dim=-1)
        return SampledOnDevice(ids, ids, specs, [], 0, staging)
    rows = SampleRows.stack([row_params(s) for s in specs], logits.shape[-1])
    ids = ops.sample_batch(logits, rows)
    asks = [i for i, s in enumerate(specs) if s.params.logprobs or s.params.top_logprobs]
    parts = [ids.to(torch.float64)]  # ids < 2^53 and fp32 values are exact in float64: one read for all
    k_max = 0
    if asks:
        if len(asks) == len(specs):
            sub, sub_ids = logits, ids
        else:
            index = torch.tensor(asks, dtype=torch.int64).to(logits.device, non_blocking=True)
            sub, sub_ids = logits.index_select(0, index), ids.index_select(0, index)
        lp = torch.log_softmax(sub.float(), dim=-1)
        parts.append(lp.gather(1, sub_ids[:, None]).reshape(-1).to(torch.float64))
        k_max = max(min(specs[i].params.top_logprobs, MAX_LOGPROBS) for i in asks)
        if k_max:
            vals, top = top_logprobs(lp, k_max)
            parts += [vals.reshape(-1).to(torch.float64), top.reshape(-1).to(torch.float64)]
    return SampledOnDevice(ids, torch.cat(parts), specs, asks, k_max, staging)


def sample_step(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> list[Sampled]:
    """``sample_launch`` and wait: the tokens (and logprobs) in row order."""
    return sample_launch(logits, specs).result()
