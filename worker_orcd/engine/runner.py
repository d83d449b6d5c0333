"""The model runner: one scheduler step's batch in, sampled ids out (nano-vllm's ModelRunner, our boundary).

It owns the paged KV cache, the static decode buffers and one CUDA graph per
decode batch-size bucket; it holds no policy (the host's scheduler decides
what runs). A pure-decode step whose batch fits a captured bucket replays that
graph (padding rows compute on the scratch KV block and are dropped); any
step with a prefill chunk runs eagerly. Both paths launch the same kernels
with the same configuration, so a row's numbers do not depend on the path,
the batch or the chunking (kernels/attention_paged.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..batching.step import Sampled, SampleSpec, StepBatch
from ..engine.events import SamplingParams
from .kernels.paged_layout import tile_shape
from .model import Model
from .paged_kv import SCRATCH_BLOCKS, PagedKVCache
from .sampler import sample_step

# Decode batch sizes with a captured graph: a decode step runs in the smallest bucket that holds it.
DECODE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class AttentionMeta:
    """Where each row's queries and keys are (kernels/attention_paged.py); host copies for the CPU path."""

    block_tables: torch.Tensor  # [R, max_blocks] int32, physical block ids
    tile_row: torch.Tensor  # [n_tiles] int32
    tile_q0: torch.Tensor
    row_qstart: torch.Tensor  # [R] int32
    row_qlen: torch.Tensor
    row_start: torch.Tensor
    host_rows: list[tuple[int, int, int]]  # (qstart, qlen, start) per row
    host_tables: list[list[int]]


class ModelRunner:
    def __init__(self, model: Model, kv: PagedKVCache, device: torch.device, max_seq_len: int, max_batch: int) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.cuda = device.type == "cuda"
        self._max_seq_len = max_seq_len
        self.max_batch = max_batch
        cfg = model.cfg
        self.block_t = tile_shape(cfg.n_heads, cfg.n_kv_heads)[1]
        self.max_blocks = -(-max_seq_len // kv.block_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._static: dict[str, torch.Tensor] = {}
        self._pinned: dict[str, torch.Tensor] = {}
        self._static_meta: dict[int, AttentionMeta] = {}

    # --- StepRunner ----------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    @torch.no_grad()
    def step(self, batch: StepBatch) -> list[Sampled]:
        specs = [r.sample for r in batch.rows if r.sample is not None]
        n = len(batch.rows)
        if batch.is_decode and self.graphs and n <= max(self.graphs):
            logits = self._replay(batch)[:n]
        else:
            logits = self._eager(batch)
        if not specs:
            return []
        return self._sample(logits, specs)

    # --- inputs ------------------------------------------------------------------------------

    def _slot(self, table: Sequence[int], pos: int) -> int:
        bs = self.kv.block_size
        return (table[pos // bs] + SCRATCH_BLOCKS) * bs + pos % bs

    def _eager(self, batch: StepBatch) -> torch.Tensor:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[tuple[int, int, int]] = []
        tables: list[list[int]] = []
        tile_row: list[int] = []
        tile_q0: list[int] = []
        sample_index: list[int] = []
        for r, row in enumerate(batch.rows):
            qstart, qlen = len(tokens), len(row.tokens)
            tokens.extend(row.tokens)
            positions.extend(range(row.start, row.start + qlen))
            slots.extend(self._slot(row.block_table, p) for p in range(row.start, row.start + qlen))
            rows.append((qstart, qlen, row.start))
            tables.append([b + SCRATCH_BLOCKS for b in row.block_table])
            for q0 in range(0, qlen, self.block_t):
                tile_row.append(r)
                tile_q0.append(q0)
            if row.sample is not None:
                sample_index.append(qstart + qlen - 1)
        width = max(len(t) for t in tables)
        bt = torch.zeros((len(tables), width), dtype=torch.int32)
        for i, t in enumerate(tables):
            bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        dev = self.device

        def i32(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int32).to(dev, non_blocking=True)

        meta = AttentionMeta(
            block_tables=bt.to(dev, non_blocking=True),
            tile_row=i32(tile_row),
            tile_q0=i32(tile_q0),
            row_qstart=i32([q for q, _, _ in rows]),
            row_qlen=i32([n for _, n, _ in rows]),
            row_start=i32([s for _, _, s in rows]),
            host_rows=rows,
            host_tables=tables,
        )
        i64 = torch.tensor([tokens, positions, slots], dtype=torch.int64).to(dev, non_blocking=True)
        if not sample_index:
            sample_index = [len(tokens) - 1]  # a prefill-only step still runs the head once (cheap, fixed shapes)
        sidx = torch.tensor(sample_index, dtype=torch.int64).to(dev, non_blocking=True)
        return self.model.forward_step(i64[0], i64[1], i64[2], meta, sidx, self.kv)

    # --- CUDA graphs for decode ----------------------------------------------------------------

    def _alloc_static(self, b_max: int) -> None:
        dev = self.device
        ar = torch.arange(b_max, dtype=torch.int32, device=dev)
        self._static = {
            "i64": torch.zeros((3, b_max), dtype=torch.int64, device=dev),  # tokens, positions, slots
            "bt": torch.zeros((b_max, self.max_blocks), dtype=torch.int32, device=dev),
            "row_start": torch.zeros(b_max, dtype=torch.int32, device=dev),
            "arange": ar,
            "zeros": torch.zeros(b_max, dtype=torch.int32, device=dev),
            "ones": torch.ones(b_max, dtype=torch.int32, device=dev),
            "sidx": torch.arange(b_max, dtype=torch.int64, device=dev),
        }
        # host staging for one step's inputs (pinned: the copies do not block the host)
        self._pinned = {
            "i64": torch.zeros((3, b_max), dtype=torch.int64, pin_memory=True),
            "bt": torch.zeros((b_max, self.max_blocks), dtype=torch.int32, pin_memory=True),
        }

    def _bucket_meta(self, b: int) -> AttentionMeta:
        s = self._static
        return AttentionMeta(
            block_tables=s["bt"][:b], tile_row=s["arange"][:b], tile_q0=s["zeros"][:b], row_qstart=s["arange"][:b],
            row_qlen=s["ones"][:b], row_start=s["row_start"][:b], host_rows=[], host_tables=[],
        )

    def _run_bucket(self, b: int) -> torch.Tensor:
        s = self._static
        return self.model.forward_step(
            s["i64"][0, :b], s["i64"][1, :b], s["i64"][2, :b], self._static_meta[b], s["sidx"][:b], self.kv
        )

    @torch.no_grad()
    def capture(self, buckets: Sequence[int] | None = None) -> None:
        """Record one decode graph per bucket (one shared memory pool: they never run at once).

        Warm-up and capture run on rows that point at the scratch block only.
        """
        if not self.cuda:
            return
        sizes = [b for b in (buckets or DECODE_BUCKETS) if b <= self.max_batch] or [1]
        if max(sizes) < self.max_batch:
            sizes.append(self.max_batch)
        self._alloc_static(max(sizes))
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for b in sorted(sizes):
            self._static_meta[b] = self._bucket_meta(b)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._run_bucket(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._run_bucket(b)
            self.graphs[b] = (graph, logits)
        torch.cuda.synchronize(self.device)

    def _replay(self, batch: StepBatch) -> torch.Tensor:
        n = len(batch.rows)
        b = min(x for x in self.graphs if x >= n)
        s, h = self._static, self._pinned
        bs = self.kv.block_size
        width = max(len(r.block_table) for r in batch.rows)
        i64 = h["i64"].numpy()[:, :b]
        bt = h["bt"].numpy()[:b, :width]
        i64[:] = 0  # padding rows: token 0 at position 0 of the scratch block (slot 0, table of zeros)
        bt[:] = 0
        for i, row in enumerate(batch.rows):
            pos = row.start
            table = row.block_table
            i64[0, i] = row.tokens[0]
            i64[1, i] = pos
            i64[2, i] = (table[pos // bs] + SCRATCH_BLOCKS) * bs + pos % bs
            bt[i, : len(table)] = np.asarray(table, dtype=np.int32) + SCRATCH_BLOCKS
        s["i64"][:, :b].copy_(h["i64"][:, :b], non_blocking=True)
        s["row_start"][:b].copy_(s["i64"][1, :b])
        s["bt"][:b, :width].copy_(h["bt"][:b, :width], non_blocking=True)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits

    # --- sampling ------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, specs: list[SampleSpec]) -> list[Sampled]:
        """Every row in one batched draw (engine/sampler.py); an all-greedy step is one argmax."""
        return sample_step(logits, specs)

    @torch.no_grad()
    def prefill_logits(self, ids: Sequence[int], chunk: int | None = None) -> torch.Tensor:
        """fp32 logits [V] of the last of ``ids`` computed from scratch, in chunks of ``chunk`` tokens.

        For tests and benchmarks: it uses the highest KV blocks outside the engine loop's
        bookkeeping, so call it only while no job runs.
        """
        from ..batching.step import StepRow

        ids = [int(t) for t in ids]
        n = len(ids)
        bs = self.kv.block_size
        need = -(-n // bs)
        if need > self.num_blocks or n > self.max_seq_len:
            raise ValueError(f"{n} tokens do not fit the KV pool")
        table = tuple(range(self.num_blocks - need, self.num_blocks))
        chunk = chunk or n
        logits = None
        for start in range(0, n, chunk):
            toks = tuple(ids[start : start + chunk])
            last = start + len(toks) == n
            spec = SampleSpec(SamplingParams(max_tokens=1), 0) if last else None
            logits = self._eager(StepBatch((StepRow(-1, toks, start, table, spec),)))
        assert logits is not None
        return logits[0]

    # --- housekeeping --------------------------------------------------------------------------

    @torch.no_grad()
    def warmup(self, force: bool = False) -> None:
        """Compile the step and sampling kernels at load (on the scratch block), so the first
        request's TTFT is not a JIT compile (CUDA; ``force`` runs it on the CPU too, for tests)."""
        from ..batching.step import StepRow

        if not (self.cuda or force):
            return
        bs = self.kv.block_size
        n = min(8, bs)
        specs = (
            SamplingParams(max_tokens=1),
            SamplingParams(max_tokens=1, temperature=0.7),
            SamplingParams(max_tokens=1, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1),
            SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9),
        )
        for p in specs:
            row = StepRow(-1, tuple([0] * n), 0, (-SCRATCH_BLOCKS,), SampleSpec(p, 0, history=(0,) * n))
            self.step(StepBatch((row,)))
        # one step per matmul launch configuration (qmatmul.launch_config varies with the row count), so no
        # prompt length meets a JIT compile; the rows sit on the scratch block, one token each
        for m in (24, 48, 80):
            rows = tuple(StepRow(-1, (0,), 0, (-SCRATCH_BLOCKS,), None) for _ in range(m - 1))
            last = StepRow(-1, (0,), 0, (-SCRATCH_BLOCKS,), SampleSpec(specs[0], 0))
            self._eager(StepBatch((*rows, last)))
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def buffers(self) -> list[torch.Tensor]:
        """Device scratch owned here (attested with the weights)."""
        out = list(self._static.values())
        out += [logits for _, logits in self.graphs.values()]
        return out

    def close(self) -> None:
        """Drop every device buffer this runner references (graphs, their pool, statics, KV, weights)."""
        self.graphs.clear()
        self._static.clear()
        self._static_meta.clear()
        self._pinned.clear()
        self.model = None  # type: ignore[assignment]
        self.kv = None  # type: ignore[assignment]
