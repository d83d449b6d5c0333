"""Prefill + decode loop with a CUDA-graph-captured decode step (SPEC 4700, 4710-4712).

The decode step reads its token, position and sequence length from static
device buffers and advances them itself, so after the first token no host
data goes to the device: per token the host replays the graph (one launch),
runs the sampler outside the graph (sampling settings change per request
without recapture; its output is copied device-to-device into the token
buffer), and copies the sampled id into a small pinned ring without
blocking. The host reads token i while the GPU already runs step i+1, so the
only per-token synchronisation is an event wait that is usually satisfied.
A stream therefore reaches the caller one decode step late, and on a stop
token one extra step has been computed and is discarded.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from . import ops
from .events import GenerationEnd, SamplingParams, StopReason, TokenEvent
from .kv_cache import KVCache
from .model import Model

# Prompt lengths with a captured prefill graph: a prompt runs in the smallest bucket that holds
# it (padding <= 50%); longer prompts run eagerly in chunks. Eager prefill is host-bound
# (hundreds of launches of ~10-100 us each), the graph replays them in one call.
PREFILL_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
LOOKAHEAD = 1  # decode steps queued on the GPU ahead of the token the host is reading
RING = LOOKAHEAD + 2


Cancel = threading.Event | Callable[[], bool] | None


def _cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _per_token_host_work(p: SamplingParams) -> bool:
    """Features the single-job loop implements on the host, per token (the batched engine does them on
    device): OpenAI penalties, logprobs and a grammar constraint."""
    return bool(p.presence_penalty or p.frequency_penalty or p.logprobs or p.constraint is not None)


def _needs_history(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)


def _shape_logits(logits: torch.Tensor, p: SamplingParams, generated: torch.Tensor) -> torch.Tensor:
    """logit -= presence * [count > 0] + frequency * count over generated ids; then the constraint's
    packed bitmask (ids past it, e.g. padding rows beyond the tokenizer, are disallowed)."""
    out = logits.detach().float().reshape(-1).clone()
    V = out.numel()
    if (p.presence_penalty or p.frequency_penalty) and generated.numel():
        counts = torch.bincount(generated.to(torch.int64).clamp(0, V - 1), minlength=V).to(out.dtype)
        out -= p.presence_penalty * (counts > 0).to(out.dtype) + p.frequency_penalty * counts
    if p.constraint is not None:
        words = torch.from_numpy(np.ascontiguousarray(p.constraint.allowed(), dtype=np.int32)).to(out.device)
        bits = (words.to(torch.int64).unsqueeze(1) >> torch.arange(32, device=out.device)) & 1
        allowed = torch.zeros(V, dtype=torch.bool, device=out.device)
        n = min(V, bits.numel())
        allowed[:n] = bits.reshape(-1)[:n].bool()
        out.masked_fill_(~allowed, float("-inf"))
    return out.reshape(logits.shape)


def _logprobs_of(raw: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Chosen token's log-probability and the ``top`` most likely alternatives, from the raw logits."""
    lp = torch.log_softmax(raw.detach().float().reshape(-1), dim=-1)
    alts: tuple[tuple[int, float], ...] = ()
    if top > 0:
        vals, ids = torch.topk(lp, min(top, lp.numel()))
        alts = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist()))
    return float(lp[token]), alts


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up stream per device for the process: cuBLAS keeps a workspace per stream, so a
    fresh stream per load would leave another workspace behind each time."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class Generator:
    """Owns the static decode buffers and the captured graph of one resident model."""

    def __init__(self, model: Model, kv: KVCache, device: torch.device, prefill_chunk: int) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.cuda = device.type == "cuda"
        self.prefill_chunk = prefill_chunk
        # static decode inputs: the graph reads and advances these in place
        self.token = torch.zeros(1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self.seq_len = torch.ones(1, dtype=torch.int32, device=device)
        self.history = torch.zeros(kv.max_seq_len, dtype=torch.int64, device=device)  # ids for the repetition penalty
        self.ring = torch.zeros(RING, dtype=torch.int64, pin_memory=self.cuda)
        self.events = [torch.cuda.Event() for _ in range(RING)] if self.cuda else []
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        # captured prefill: static padded tokens, positions 0.., the last real row, one graph per bucket
        self.pf_max = 0
        self.pf_tokens: torch.Tensor | None = None
        self.pf_positions: torch.Tensor | None = None
        self.pf_last = torch.zeros(1, dtype=torch.int64, device=device)
        self.pf_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._logprobs: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}  # step -> (chosen, top)

    def buffers(self) -> list[torch.Tensor]:
        """Device scratch owned here (attested with the weights and the KV cache)."""
        out = [self.token, self.pos, self.seq_len, self.history, self.pf_last]
        if self.graph_logits is not None:
            out.append(self.graph_logits)
        if self.pf_tokens is not None and self.pf_positions is not None:
            out += [self.pf_tokens, self.pf_positions]
        out += [logits for _, logits in self.pf_graphs.values()]
        return out

    # --- one decode step ----------------------------------------------------------------------

    def _step(self) -> torch.Tensor:
        logits = self.model.decode(self.token, self.pos, self.seq_len)
        self.pos.add_(1)
        self.seq_len.add_(1)
        return logits

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Record the decode step once; replays reuse the same addresses and kernels.

        Warm-up runs compile every Triton kernel and create the cuBLAS handle
        outside the capture. They write K/V at positions 0..warmup-1, which
        every request overwrites before reading (prefill writes 0..P-1, P >= 1).
        """
        if not self.cuda:
            return
        self.pos.zero_()
        self.seq_len.fill_(1)
        side = _side_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step()
        self.graph, self.graph_logits = graph, logits
        torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def capture_prefill(self) -> None:
        """Record one prefill graph per bucket (sharing one memory pool: they never run at once).

        Warm-up runs compile the kernels for each shape outside the capture;
        like decode warm-up they write K/V rows a request overwrites first.
        """
        if not self.cuda:
            return
        self.pf_max = max((b for b in PREFILL_BUCKETS if b <= min(self.prefill_chunk, self.kv.max_seq_len)), default=0)
        if self.pf_max == 0:
            return
        self.pf_tokens = torch.zeros(self.pf_max, dtype=torch.int64, device=self.device)
        self.pf_positions = torch.arange(self.pf_max, dtype=torch.int64, device=self.device)
        pool = torch.cuda.graph_pool_handle()
        side = _side_stream(self.device)
        for b in (b for b in PREFILL_BUCKETS if b <= self.pf_max):
            self.pf_last.fill_(b - 1)
            args = (self.pf_tokens[:b], 0, self.pf_last, self.pf_positions[:b])
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.model.prefill(*args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.prefill(*args)
            self.pf_graphs[b] = (graph, logits)
        torch.cuda.synchronize(self.device)

    _WARMUP_SAMPLING = (
        SamplingParams(max_tokens=1),
        SamplingParams(max_tokens=1, temperature=0.7),
        SamplingParams(max_tokens=1, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1),
        SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9),
    )

    @torch.no_grad()
    def warmup(self, force: bool = False) -> None:
        """Compile the prefill and sampling kernels at load, so the first request's TTFT is not a
        JIT compile (CUDA; ``force`` runs it on the CPU too, for tests). Writes K/V at positions
        0..7, which every request overwrites before reading."""
        if not (self.cuda or force):
            return
        ids = torch.zeros(min(8, self.kv.max_seq_len), dtype=torch.int64, device=self.device)
        logits = self.prefill(ids)
        for i, p in enumerate(self._WARMUP_SAMPLING):
            self._sample(logits, p, ids.shape[0], i)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def decode_step(self) -> torch.Tensor:
        if self.graph is not None and self.graph_logits is not None:
            self.graph.replay()
            return self.graph_logits
        return self._step()

    # --- prefill ------------------------------------------------------------------------------

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Whole prompt, in chunks of ``prefill_chunk`` tokens; fp32 logits of its last token.

        A prompt that fits a captured bucket replays that bucket's graph instead.
        """
        n = ids.shape[0]
        if self.pf_graphs and self.pf_tokens is not None and n <= self.pf_max:
            bucket = next(b for b in PREFILL_BUCKETS if b >= n and b in self.pf_graphs)
            self.pf_tokens[:n].copy_(ids)
            self.pf_last.fill_(n - 1)
            graph, out = self.pf_graphs[bucket]
            graph.replay()
            return out
        logits = None
        for start in range(0, ids.shape[0], self.prefill_chunk):
            logits = self.model.prefill(ids[start : start + self.prefill_chunk], start)
        assert logits is not None
        return logits

    # --- the loop -----------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, p: SamplingParams, n_ctx: int, step: int) -> torch.Tensor:
        penalty = self.history[:n_ctx] if p.repetition_penalty != 1.0 else None
        raw = logits
        if _per_token_host_work(p):
            logits = _shape_logits(logits, p, self.history[n_ctx - step : n_ctx])
        nxt = ops.sample(
            logits,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty,
            penalty_ids=penalty,
            seed=p.seed,
            step=step,
        )
        if _per_token_host_work(p):
            token = int(nxt.reshape(-1)[0])  # a constraint must see this token before the next mask
            if p.logprobs:
                self._logprobs[step] = _logprobs_of(raw, token, p.top_logprobs)
            if p.constraint is not None:
                p.constraint.accept(token)
        return nxt

    def _event(self, index: int, token: int) -> TokenEvent:
        got = self._logprobs.pop(index, None)
        if got is None:
            return TokenEvent(index, token)
        return TokenEvent(index, token, logprob=got[0], top_logprobs=got[1])

    def _emit(self, nxt: torch.Tensor, slot: int) -> None:
        self.ring[slot : slot + 1].copy_(nxt.reshape(1), non_blocking=True)
        if self.cuda:
            self.events[slot].record()

    def _read(self, slot: int) -> int:
        if self.cuda:
            self.events[slot].synchronize()
        return int(self.ring[slot])

    @torch.no_grad()
    def run(
        self, prompt_ids: Sequence[int], p: SamplingParams, cancel: Cancel = None
    ) -> Iterator[TokenEvent | GenerationEnd]:
        """Stream tokens for a validated request; the caller has checked ids and capacity."""
        t0 = time.perf_counter()
        n_prompt = len(prompt_ids)
        ids = torch.tensor(list(prompt_ids), dtype=torch.int64).to(self.device, non_blocking=False)
        self._logprobs.clear()
        if _needs_history(p):
            self.history[:n_prompt].copy_(ids)
        logits = self.prefill(ids)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # the first token waits for it anyway
        prefill_ms = (time.perf_counter() - t0) * 1e3
        nxt = self._sample(logits, p, n_prompt, 0)
        self._emit(nxt, 0)
        first = self._read(0)
        t_first = time.perf_counter()
        ttft_ms = (t_first - t0) * 1e3
        n_out = 1
        yield self._event(0, first)

        def end(reason: StopReason) -> GenerationEnd:
            return GenerationEnd(n_prompt, n_out, reason, prefill_ms, ttft_ms, (time.perf_counter() - t_first) * 1e3)

        if first in p.stop_ids:
            yield end("eos")
            return
        if n_out >= p.max_tokens:
            yield end("max_tokens")
            return
        # the decode buffers take over: token, position and length of the next step
        self.token.copy_(nxt.reshape(1))
        self.pos.fill_(n_prompt)
        self.seq_len.fill_(n_prompt + 1)
        if _needs_history(p):
            self.history[n_prompt : n_prompt + 1].copy_(nxt.reshape(1))
        pending: deque[tuple[int, int]] = deque()  # (token index, ring slot) queued on the GPU
        step = 1
        while True:
            if _cancelled(cancel):
                yield end("cancelled")
                return
            while step < p.max_tokens and len(pending) <= LOOKAHEAD:
                logits = self.decode_step()
                nxt = self._sample(logits, p, n_prompt + step, step)
                self.token.copy_(nxt.reshape(1))
                if _needs_history(p):
                    self.history[n_prompt + step : n_prompt + step + 1].copy_(nxt.reshape(1))
                slot = step % RING
                self._emit(nxt, slot)
                pending.append((step, slot))
                step += 1
            if not pending:
                yield end("max_tokens")
                return
            index, slot = pending.popleft()
            token = self._read(slot)
            if _cancelled(cancel):  # no token after a cancel is acknowledged (SPEC 4252)
                yield end("cancelled")
                return
            n_out += 1
            yield self._event(index, token)
            if token in p.stop_ids:
                yield end("eos")
                return
