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

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..batching.step import PENDING, Sampled, SampleSpec, StepBatch, StepRow
from ..engine.events import SamplingParams
from .kernels.paged_layout import split_keys, split_partial_bytes, split_scratch_slots, tile_shape
from .model import Model
from .paged_kv import SCRATCH_BLOCKS, PagedKVCache
from .sampler import ReadStaging, SampledOnDevice, sample_launch

# Decode batch sizes with a captured graph: a decode step runs in the smallest bucket that holds it.
DECODE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# token counts of the graphs for steps with prompt chunks: a step replays the smallest that holds it, so a
# 129-192-token step (63 decode rows + a 129-token chunk under a 192 cap) costs ~3/4 of a 256 one (RESULTS;
# the mixed-step cap, api.MIXED_STEP_TOKENS_CUDA, trades p99 inter-token latency for throughput)
MIXED_TOKEN_BUCKETS = (64, 128, 192, 224, 256, 384, 512, 1024, 2048)


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
    # (slot0 per tile, partial max/sum, partial acc, merge counters): the split passes (decode graphs), else one pass
    split: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _upload(dst: torch.Tensor, host: torch.Tensor, stage: torch.Tensor) -> None:
    """``dst`` (a device view) <- the first ``dst.numel()`` values of pinned ``host``, row-major in
    ``dst``'s shape, without a host wait: from a non-contiguous pinned slice torch would first copy
    to pageable memory, and a copy from pageable memory waits for every step queued before it."""
    n = dst.numel()
    src = host.view(-1)[:n].view(dst.shape)
    if dst.is_contiguous():
        dst.copy_(src, non_blocking=True)
        return
    tmp = stage[:n].view(dst.shape)
    tmp.copy_(src, non_blocking=True)
    dst.copy_(tmp)


def _rows(host: torch.Tensor, r: int, c: int) -> np.ndarray:
    """The first r*c values of pinned ``host`` as an [r, c] array (the layout ``_upload`` reads)."""
    return host.view(-1)[: r * c].numpy().reshape(r, c)


def decode_inputs(rows: Sequence[StepRow], bs: int, i64: np.ndarray, bt: np.ndarray) -> None:
    """A decode step's inputs, vectorised (one conversion of all block tables, not one per row):
    ``i64`` [3, b] = token, position, KV slot per row; ``bt`` [b, width] = physical block tables.
    Padding rows (past ``len(rows)``): token 0 at position 0 of the scratch block, tables of zeros."""
    n = len(rows)
    lens = np.fromiter((len(r.block_table) for r in rows), dtype=np.int64, count=n)
    flat = np.fromiter(itertools.chain.from_iterable(r.block_table for r in rows), dtype=np.int64,
                       count=int(lens.sum())) + SCRATCH_BLOCKS
    pos = np.fromiter((r.start for r in rows), dtype=np.int64, count=n)
    first = np.zeros(n, dtype=np.int64)
    np.cumsum(lens[:-1], out=first[1:])
    i64[:] = 0
    i64[0, :n] = [r.tokens[0] for r in rows]
    i64[1, :n] = pos
    i64[2, :n] = flat[first + pos // bs] * bs + pos % bs
    bt[:] = 0
    bt[:n][np.arange(bt.shape[1]) < lens[:, None]] = flat


# the weights' upload may stream on another thread meanwhile (upload.UploadThread): its allocations and stream
# syncs are legal beside a thread-local capture, not beside a global one
CAPTURE_MODE = "thread_local"


class _Nothing:
    """The result of a step that samples nothing (prompt chunks only)."""

    def result(self) -> list[Sampled]:
        return []


_NOTHING = _Nothing()


class ModelRunner:
    def __init__(
        self, model: Model, kv: PagedKVCache, device: torch.device, max_seq_len: int, max_batch: int,
        max_tokens: int | None = None,
    ) -> None:
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
        # steps with prompt chunks: graphs per (tokens, rows) bucket (see _mixed_replay)
        self.max_tokens = max(max_tokens or max_batch, max_batch)
        self.mixed_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mixed: dict[str, torch.Tensor] = {}
        self._mixed_pinned: dict[str, torch.Tensor] = {}
        self._mixed_meta: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._mixed_dims = (0, 0, 0)  # (tokens, rows, tiles) of the largest bucket
        # the pinned staging buffers are refilled every step, but their copies to the device run
        # asynchronously: a step that samples nothing (a prompt chunk) does not wait for the device,
        # so the next step waits for the previous copies before it overwrites their source
        self._staged: torch.cuda.Event | None = None
        # the previous launch's draw: seq_id -> row of its device ids (the next step's PENDING tokens)
        self._prev: tuple[dict[int, int], torch.Tensor] | None = None
        self.pending_reads = 0  # PENDING tokens read on the device (steps that overlapped the host's read)
        self._pend_host = torch.zeros((2, max_batch), dtype=torch.int64, pin_memory=self.cuda)
        self._pend_dev = torch.zeros((2, max_batch), dtype=torch.int64, device=device)
        self._pend_staged: torch.cuda.Event | None = None
        self._reads = ReadStaging() if self.cuda else None
        # the split attention passes' partials (decode graphs: a lone long row on many SMs, kernels/attention_paged.py)
        self.split_s = split_keys(cfg.head_dim, kv.k.dtype.itemsize)
        self.split_slots = split_scratch_slots(max_seq_len, self.split_s)
        self._split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.split_fallbacks = 0  # decode steps whose rows needed more partial slots: one pass (same numbers)

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
        return self.launch(batch).result()

    @torch.no_grad()
    def launch(self, batch: StepBatch) -> SampledOnDevice:
        """Queue the step (inputs, forward, draw) without waiting for the device; ``result()`` reads it."""
        specs = [r.sample for r in batch.rows if r.sample is not None]
        logits = self.logits(batch)
        if not specs:
            self._prev = None
            return _NOTHING
        out = sample_launch(logits, specs, self._reads)
        self._prev = ({r.seq_id: i for i, r in enumerate(r for r in batch.rows if r.sample is not None)}, out.ids)
        return out

    def adopt_draws(self, batch: StepBatch, ids: torch.Tensor | None) -> None:
        """A tensor-parallel member: ``ids`` [sampled rows] are what rank 0 drew for ``batch`` (received
        on the device), so the next step's PENDING tokens resolve here as they do on rank 0."""
        sampled = [r.seq_id for r in batch.rows if r.sample is not None]
        if not sampled:
            self._prev = None
            return
        if ids is None or ids.numel() != len(sampled):
            raise RuntimeError(f"{len(sampled)} sampled rows but draws of {None if ids is None else ids.numel()}")
        self._prev = ({sid: i for i, sid in enumerate(sampled)}, ids)

    def logits(self, batch: StepBatch, eager: bool = False) -> torch.Tensor:
        """fp32 logits of the step's sampled rows (the last row when none samples): a decode graph,
        a mixed-step graph or eager launches; the same kernels and per-row arithmetic on every path."""
        n = len(batch.rows)
        if not eager and batch.is_decode and self.graphs and n <= max(self.graphs):
            out = self._replay(batch)
            if out is not None:
                return out[:n]
            self.split_fallbacks += 1  # more partial slots than the scratch holds: a mixed graph (one pass)
        if not eager and self.mixed_graphs:
            key = self._mixed_bucket(batch)
            if key is not None:
                return self._mixed_replay(batch, key)
        return self._eager(batch)

    # --- inputs ------------------------------------------------------------------------------

    def _pending_tokens(self, batch: StepBatch) -> list[tuple[int, int]]:
        """(flat token index, seq_id) of each PENDING token: a sequence's last token, drawn by the
        previous launch and not yet read by the host."""
        found: list[tuple[int, int]] = []
        t = 0
        for row in batch.rows:
            t += len(row.tokens)
            if row.tokens[-1] == PENDING:
                found.append((t - 1, row.seq_id))
            if PENDING in row.tokens[:-1]:
                raise RuntimeError(f"row of sequence {row.seq_id}: only its last token may be pending")
        return found

    def _fill_pending(self, tokens: torch.Tensor, found: list[tuple[int, int]]) -> None:
        """Write the previous launch's draws into ``tokens`` (the step's device token ids) in place."""
        if not found:
            return
        if self._prev is None:
            raise RuntimeError("a PENDING token without a previous launch that sampled")
        index, ids = self._prev
        try:
            src = [index[sid] for _, sid in found]
        except KeyError as e:
            raise RuntimeError(f"sequence {e.args[0]} was not sampled by the previous launch") from None
        dst = [t for t, _ in found]
        n = len(found)
        if self.cuda and n <= self._pend_host.shape[1]:
            # through pinned staging: a copy from pageable memory may wait for the queued step,
            # which is exactly the wait this overlap removes
            if self._pend_staged is not None:
                self._pend_staged.synchronize()  # the previous launch's copy has read the buffer
            host = _rows(self._pend_host, 2, n)
            host[0] = dst
            host[1] = src
            pos = self._pend_dev.view(-1)[: 2 * n].view(2, n)
            pos.copy_(self._pend_host.view(-1)[: 2 * n].view(2, n), non_blocking=True)
            self._pend_staged = torch.cuda.Event()
            self._pend_staged.record()
        else:
            pos = torch.tensor([dst, src], dtype=torch.int64).to(tokens.device)
        tokens.index_copy_(0, pos[0], ids.index_select(0, pos[1]))
        self.pending_reads += len(found)

    def _layout(self, batch: StepBatch) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]],
                                                  list[list[int]], list[int], list[int], list[int]]:
        """The step's rows back to back: tokens, positions, cache slots, (qstart, qlen, start) per
        row, physical block tables, the attention tile map and the rows whose logits are sampled."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[tuple[int, int, int]] = []
        tables: list[list[int]] = []
        tile_row: list[int] = []
        tile_q0: list[int] = []
        sample_index: list[int] = []
        bs = self.kv.block_size
        for r, row in enumerate(batch.rows):
            qstart, qlen = len(tokens), len(row.tokens)
            tokens.extend(row.tokens)
            positions.extend(range(row.start, row.start + qlen))
            table = [b + SCRATCH_BLOCKS for b in row.block_table]
            slots.extend(table[p // bs] * bs + p % bs for p in range(row.start, row.start + qlen))
            rows.append((qstart, qlen, row.start))
            tables.append(table)
            for q0 in range(0, qlen, self.block_t):
                tile_row.append(r)
                tile_q0.append(q0)
            if row.sample is not None:
                sample_index.append(qstart + qlen - 1)
        if not sample_index:
            sample_index = [len(tokens) - 1]  # a prefill-only step still runs the head once (cheap, fixed shapes)
        return tokens, positions, slots, rows, tables, tile_row, tile_q0, sample_index

    def _eager(self, batch: StepBatch) -> torch.Tensor:
        tokens, positions, slots, rows, tables, tile_row, tile_q0, sample_index = self._layout(batch)
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
        self._fill_pending(i64[0], self._pending_tokens(batch))
        sidx = torch.tensor(sample_index, dtype=torch.int64).to(dev, non_blocking=True)
        return self.model.forward_step(i64[0], i64[1], i64[2], meta, sidx, self.kv)

    # --- CUDA graphs for steps with prompt chunks -----------------------------------------------
    #
    # An eager step costs ~20 ms of Python kernel launches whatever its size (H200, 0.5B:
    # benchmarks/profile_step.py), so steps with prefill chunks replay graphs too, captured per
    # (tokens, rows) bucket. Padding is inert: padding tokens (id 0, position 0) write their K/V
    # to the scratch block and no attention tile covers them; padding rows have no tokens; padding
    # tiles belong to an empty row (no key visited, nothing stored); padding logits are dropped.
    # Rows never mix in any kernel, so a row's numbers equal the eager path's (test_engine_batching).

    def _mixed_sizes(self) -> tuple[list[int], list[int]]:
        tok = [t for t in MIXED_TOKEN_BUCKETS if t < self.max_tokens] + [self.max_tokens]
        rows = [r for r in (4, 16, 64) if r < self.max_batch] + [self.max_batch]
        return tok, rows

    def _mixed_bucket(self, batch: StepBatch) -> tuple[int, int] | None:
        n_tok = sum(len(r.tokens) for r in batch.rows)
        n_rows = len(batch.rows)
        fits = [k for k in self.mixed_graphs if k[0] >= n_tok and k[1] >= n_rows]
        return min(fits) if fits else None

    def _alloc_mixed(self) -> None:
        tok, rows = self._mixed_sizes()
        t_max, r_max = max(tok), max(rows) + 1  # + one empty row that owns the padding tiles
        nt_max = -(-t_max // self.block_t) + r_max
        dev = self.device
        self._mixed = {
            "i64": torch.zeros(3 * t_max + r_max, dtype=torch.int64, device=dev),  # tokens|positions|slots|sample rows
            "i32": torch.zeros(2 * nt_max + 3 * r_max, dtype=torch.int32, device=dev),  # tiles|rows
            "bt": torch.zeros((r_max, self.max_blocks), dtype=torch.int32, device=dev),
        }
        self._mixed_pinned = {
            k: torch.zeros(v.shape, dtype=v.dtype, pin_memory=self.cuda) for k, v in self._mixed.items()
        }
        self._mixed["stage32"] = torch.zeros(r_max * self.max_blocks, dtype=torch.int32, device=dev)
        self._mixed_dims = (t_max, r_max, nt_max)

    def _mixed_views(self, t_b: int, r_b: int) -> tuple[torch.Tensor, ...]:
        t_max, r_max, nt_max = self._mixed_dims
        nt_b = -(-t_b // self.block_t) + r_b + 1
        i64, i32 = self._mixed["i64"], self._mixed["i32"]
        tokens, positions, slots = i64[:t_b], i64[t_max : t_max + t_b], i64[2 * t_max : 2 * t_max + t_b]
        sidx = i64[3 * t_max : 3 * t_max + r_b]
        o = 2 * nt_max
        meta = AttentionMeta(
            block_tables=self._mixed["bt"][: r_b + 1], tile_row=i32[:nt_b], tile_q0=i32[nt_max : nt_max + nt_b],
            row_qstart=i32[o : o + r_b + 1], row_qlen=i32[o + r_max : o + r_max + r_b + 1],
            row_start=i32[o + 2 * r_max : o + 2 * r_max + r_b + 1], host_rows=[], host_tables=[],
        )
        return tokens, positions, slots, meta, sidx  # type: ignore[return-value]

    def _run_mixed(self, key: tuple[int, int]) -> torch.Tensor:
        tokens, positions, slots, meta, sidx = self._mixed_meta[key]
        return self.model.forward_step(tokens, positions, slots, meta, sidx, self.kv)  # type: ignore[arg-type]

    def _capture_mixed(self, pool: object, side: torch.cuda.Stream) -> None:
        self._alloc_mixed()
        tok, rows = self._mixed_sizes()
        t_max, r_max, nt_max = self._mixed_dims
        # inert contents for warm-up and capture: every tile on the empty row, every token on the scratch block
        i32 = self._mixed["i32"]
        for t_b in tok:
            for r_b in rows:
                if r_b > t_b:
                    continue
                key = (t_b, r_b)
                i32[:nt_max].fill_(r_b)
                self._mixed_meta[key] = self._mixed_views(t_b, r_b)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._run_mixed(key)
                torch.cuda.current_stream(self.device).wait_stream(side)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode=CAPTURE_MODE):
                    logits = self._run_mixed(key)
                self.mixed_graphs[key] = (graph, logits)

    def _mixed_replay(self, batch: StepBatch, key: tuple[int, int]) -> torch.Tensor:
        n = self._mixed_fill(batch, key)
        graph, logits = self.mixed_graphs[key]
        graph.replay()
        return logits[:n]

    def _mixed_fill(self, batch: StepBatch, key: tuple[int, int]) -> int:
        """Write the step, padded to bucket ``key``, into the graph's inputs; returns the logits rows."""
        t_b, r_b = key
        t_max, r_max, nt_max = self._mixed_dims
        tokens, positions, slots, rows, tables, tile_row, tile_q0, sample_index = self._layout(batch)
        T, R, NT = len(tokens), len(rows), len(tile_row)
        nt_b = -(-t_b // self.block_t) + r_b + 1
        h = self._mixed_pinned
        self._wait_staging()
        i64 = h["i64"].numpy()
        i64[: 3 * t_max + r_b] = 0
        i64[:T] = tokens
        i64[t_max : t_max + T] = positions
        i64[2 * t_max : 2 * t_max + T] = slots
        i64[3 * t_max : 3 * t_max + len(sample_index)] = sample_index
        i32 = h["i32"].numpy()
        i32[:NT] = tile_row
        i32[NT:nt_b] = r_b  # the empty row
        i32[nt_max : nt_max + nt_b] = 0
        i32[nt_max : nt_max + NT] = tile_q0
        o = 2 * nt_max
        for j, col in enumerate(zip(*rows, strict=True)):
            base = o + j * r_max
            i32[base : base + r_b + 1] = 0
            i32[base : base + R] = col
        width = max(len(t) for t in tables)
        bt = _rows(h["bt"], r_b + 1, width)
        bt[:] = 0
        for i, t in enumerate(tables):
            bt[i, : len(t)] = t
        s = self._mixed
        s["i64"][: 3 * t_max + r_b].copy_(h["i64"][: 3 * t_max + r_b], non_blocking=True)
        s["i32"].copy_(h["i32"], non_blocking=True)
        _upload(s["bt"][: r_b + 1, :width], h["bt"], s["stage32"])
        self._staging_done()
        self._fill_pending(s["i64"][:T], self._pending_tokens(batch))
        return len(sample_index)

    def _wait_staging(self) -> None:
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copies have read the pinned buffers
            self._staged = None

    def _staging_done(self) -> None:
        if self.cuda:
            self._staged = torch.cuda.Event()
            self._staged.record()

    # --- CUDA graphs for decode ----------------------------------------------------------------

    def _alloc_static(self, b_max: int) -> None:
        dev = self.device
        ar = torch.arange(b_max, dtype=torch.int32, device=dev)
        self._static = {
            "i64": torch.zeros((4, b_max), dtype=torch.int64, device=dev),  # tokens, positions, slots, split slot0
            "slot0": ar.clone(),  # each row's first partial slot (the split attention passes)
            "bt": torch.zeros((b_max, self.max_blocks), dtype=torch.int32, device=dev),
            "row_start": torch.zeros(b_max, dtype=torch.int32, device=dev),
            "arange": ar,
            "zeros": torch.zeros(b_max, dtype=torch.int32, device=dev),
            "ones": torch.ones(b_max, dtype=torch.int32, device=dev),
            "sidx": torch.arange(b_max, dtype=torch.int64, device=dev),
            "stage64": torch.zeros(4 * b_max, dtype=torch.int64, device=dev),
            "stage32": torch.zeros(b_max * self.max_blocks, dtype=torch.int32, device=dev),
        }
        # host staging for one step's inputs (pinned: the copies do not block the host)
        self._pinned = {
            "i64": torch.zeros((4, b_max), dtype=torch.int64, pin_memory=True),
            "bt": torch.zeros((b_max, self.max_blocks), dtype=torch.int32, pin_memory=True),
        }

    def _alloc_split(self, b_max: int) -> None:
        cfg = self.model.cfg
        g_pad, block_t = tile_shape(cfg.n_heads, cfg.n_kv_heads)
        bm, bd = g_pad * block_t, max(16, 1 << max(0, (cfg.head_dim - 1).bit_length()))
        n, hk = self.split_slots, cfg.n_kv_heads
        self._split = (torch.empty((n, hk, 2, bm), dtype=torch.float32, device=self.device),
                       torch.empty((n, hk, bm, bd), dtype=torch.float32, device=self.device),
                       # a counter per (tile, kv head): the last split program of a tile merges (zero after each layer)
                       torch.zeros((b_max * hk,), dtype=torch.int32, device=self.device))
        assert self._split[0][0].numel() * 4 + self._split[1][0].numel() * 4 == split_partial_bytes(
            cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)  # what plan.scratch_bytes counts

    def _bucket_meta(self, b: int) -> AttentionMeta:
        s = self._static
        assert self._split is not None
        return AttentionMeta(
            block_tables=s["bt"][:b], tile_row=s["arange"][:b], tile_q0=s["zeros"][:b], row_qstart=s["arange"][:b],
            row_qlen=s["ones"][:b], row_start=s["row_start"][:b], host_rows=[], host_tables=[],
            split=(s["slot0"][:b], *self._split),
        )

    def _run_bucket(self, b: int) -> torch.Tensor:
        s = self._static
        return self.model.forward_step(
            s["i64"][0, :b], s["i64"][1, :b], s["i64"][2, :b], self._static_meta[b], s["sidx"][:b], self.kv
        )

    @torch.no_grad()
    def capture(self, buckets: Sequence[int] | None = None, mixed: bool = True) -> None:
        """Record one decode graph per bucket (one shared memory pool: they never run at once).

        Warm-up and capture run on rows that point at the scratch block only.
        """
        if not self.cuda:
            return
        sizes = [b for b in (buckets or DECODE_BUCKETS) if b <= self.max_batch] or [1]
        if max(sizes) < self.max_batch:
            sizes.append(self.max_batch)
        self._alloc_static(max(sizes))
        self._alloc_split(max(sizes))
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
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=CAPTURE_MODE):
                logits = self._run_bucket(b)
            self.graphs[b] = (graph, logits)
        if mixed:
            self._capture_mixed(pool, side)
        torch.cuda.synchronize(self.device)

    def _replay(self, batch: StepBatch) -> torch.Tensor | None:
        """Replay the decode graph of ``batch``'s bucket; None when its rows need more split partial
        slots than the scratch holds (then the caller runs the step in one pass: the same numbers)."""
        n = len(batch.rows)
        b = min(x for x in self.graphs if x >= n)
        S = self.split_s
        splits = np.fromiter((r.start // S + 1 for r in batch.rows), dtype=np.int64, count=n)
        if int(splits.sum()) + (b - n) > self.split_slots:  # + one split per padding row (position 0)
            return None
        s, h = self._static, self._pinned
        bs = self.kv.block_size
        width = max(len(r.block_table) for r in batch.rows)
        self._wait_staging()
        i64 = _rows(h["i64"], 4, b)
        decode_inputs(batch.rows, bs, i64[:3], _rows(h["bt"], b, width))
        i64[3, 0] = 0
        np.cumsum(splits[:-1], out=i64[3, 1:n])
        if b > n:
            i64[3, n:] = int(splits.sum()) + np.arange(b - n)
        _upload(s["i64"][:, :b], h["i64"], s["stage64"])
        s["row_start"][:b].copy_(s["i64"][1, :b])
        s["slot0"][:b].copy_(s["i64"][3, :b])
        _upload(s["bt"][:b, :width], h["bt"], s["stage32"])
        self._staging_done()
        self._fill_pending(s["i64"][0, :n], self._pending_tokens(batch))
        graph, logits = self.graphs[b]
        graph.replay()
        return logits

    # --- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill_logits(self, ids: Sequence[int], chunk: int | None = None, eager: bool = True) -> torch.Tensor:
        """fp32 logits [V] of the last of ``ids`` computed from scratch, in chunks of ``chunk`` tokens
        (``eager=False``: each chunk a mixed-step graph where one fits, as a request's prompt runs).

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
            step = StepBatch((StepRow(-1, toks, start, table, spec),))
            logits = self._eager(step) if eager else self.logits(step)
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
        out = list(self._static.values()) + [self._pend_dev] + list(self._split or ())
        out += [logits for _, logits in self.graphs.values()]
        out += list(self._mixed.values()) + [logits for _, logits in self.mixed_graphs.values()]
        if self.model.locks is not None:
            out.append(self.model.locks)
        out += [t for t in self.model.rope_freq.values() if t is not None]
        return out

    def close(self) -> None:
        """Drop every device buffer this runner references (graphs, their pool, statics, KV, weights)."""
        self.graphs.clear()
        self.mixed_graphs.clear()
        self._mixed.clear()
        self._mixed_pinned.clear()
        self._mixed_meta.clear()
        self._static.clear()
        self._static_meta.clear()
        self._split = None
        self._pinned.clear()
        self._prev = None
        self._pend_dev = self._pend_host = self._reads = None  # type: ignore[assignment]
        self.model = None  # type: ignore[assignment]
        self.kv = None  # type: ignore[assignment]
