"""One rank's slice of the resident weights (Megatron layout; the rules are in ``tp_plan.py``).

Every rank streams (and re-hashes) the whole file as for tp=1, but into its shard's arena only
(``ShardSink``): a replicated slot is written in place, a split slot into a full-size staging
tensor that is sliced into the shard as soon as its last part has arrived, then dropped. A rank
so holds its shard plus the split slots still open in file order (``staging_peak_bytes``: one layer's
at most when the file lists its tensors layer by layer), never the whole model (a 72B in fp16, 145 GB:
75.2 GB of shard per rank at tp=2, counted; 82 GB peak measured with the KV pool, RESULTS ninth session). What stays resident, is fingerprinted and sealed is the shard alone.

* dense residency: sliced after dequantization; dense values have no block boundaries.
* quantized residency: the GGUF blocks are sliced before ``make_planar`` (which then repacks the
  shard). A column-parallel matrix keeps whole rows (each row is its own run of blocks), so any
  type splits; a row-parallel one (O, down) keeps ``K/T`` inputs of every row, i.e. whole blocks
  only if ``K/T`` is a multiple of the type's block size (``check_block_split``; a Q4_K/Q6_K
  matrix needs ``K/T`` divisible by 256: Qwen2.5-7B's down, K = 18944, splits in two; 0.5B's,
  K = 4864, does not, and the load says so).
"""

from __future__ import annotations

import torch

from ..errors import ModelLoadError
from ..gguf import GGUFFile
from ..gguf.constants import BLOCK_LAYOUT, GGMLType
from .config import ModelConfig
from .qweight import row_bytes
from .weights import Slot, WeightLayout, views

# slot suffix -> how it splits; everything else (embed, lm_head, norms) is replicated
COLUMN_PARALLEL = ("wqkv", "bqkv", "w_gate_up")  # split dim 0 within each fused part
ROW_PARALLEL = ("wo", "w_down")  # split dim 1


def _kind(slot_name: str) -> str:
    leaf = slot_name.rsplit(".", 1)[-1]
    if leaf in COLUMN_PARALLEL:
        return "column"
    if leaf in ROW_PARALLEL:
        return "row"
    return "replicated"


def fused_parts(cfg: ModelConfig, slot_name: str) -> tuple[int, ...]:
    """Sizes along dim 0 of the tensors fused into a column-parallel slot (full model)."""
    leaf = slot_name.rsplit(".", 1)[-1]
    if leaf in ("wqkv", "bqkv"):
        return (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)
    if leaf == "w_gate_up":
        return (cfg.ffn_dim, cfg.ffn_dim)
    raise ValueError(f"{slot_name} is not column-parallel")


def column_shard(t: torch.Tensor, parts: tuple[int, ...], rank: int, degree: int) -> torch.Tensor:
    """Rows of each fused part's ``rank``-th 1/degree, concatenated in part order (a copy)."""
    out, off = [], 0
    for n in parts:
        if n % degree:
            raise ModelLoadError(f"a fused part of {n} rows does not split into {degree} shards")
        step = n // degree
        out.append(t[off + rank * step : off + (rank + 1) * step])
        off += n
    if off != t.shape[0]:
        raise ModelLoadError(f"fused parts cover {off} of {t.shape[0]} rows")
    return torch.cat(out, dim=0)


def row_shard(t: torch.Tensor, rank: int, degree: int) -> torch.Tensor:
    """The ``rank``-th 1/degree of the input columns (a copy)."""
    k = t.shape[1]
    if k % degree:
        raise ModelLoadError(f"{k} input columns do not split into {degree} shards")
    step = k // degree
    return t[:, rank * step : (rank + 1) * step].contiguous()


def check_block_split(ggml_type: GGMLType, k: int, degree: int) -> None:
    """A quantized matrix split along K keeps whole blocks only if K/degree is a multiple of the block size."""
    block = BLOCK_LAYOUT[ggml_type].block_size
    if k % degree or (k // degree) % block:
        raise ModelLoadError(
            f"a {ggml_type.name} matrix with K={k} cannot be split into {degree} shards on {block}-element block "
            "boundaries; load it dense (--resident-weights dense) for tensor parallel"
        )


def slot_kinds(full: WeightLayout) -> dict[str, str]:
    """How each slot splits: dense slots by their name; a quantized layout's raw slots (named by
    their GGUF tensor) by the matrix group that holds them ("0.wqkv" -> column)."""
    kinds = {name: _kind(name) for name in full.slots}
    for matrix, members in full.groups.items():
        for m in members:
            kinds[m] = _kind(matrix)
    return kinds


def shard_tensor(t: torch.Tensor, slot: Slot, kind: str, cfg: ModelConfig, rank: int, degree: int) -> torch.Tensor:
    """Rank ``rank``'s slice of the full slot (replicated slots: the tensor itself).

    A raw (quantized) slot is uint8 [N * row_bytes]: column-parallel keeps whole rows, row-parallel
    the same run of blocks of every row. A fused dense slot (wqkv, w_gate_up, bqkv) is split per part."""
    if kind == "replicated":
        return t
    if slot.ggml_type is not None:
        n, k = slot.shape
        rows = t.view(n, row_bytes(slot.ggml_type, k))
        if kind == "column":
            if n % degree:
                raise ModelLoadError(f"{slot.name}: {n} rows do not split into {degree} shards")
            step = n // degree
            return rows[rank * step : (rank + 1) * step].reshape(-1)
        check_block_split(slot.ggml_type, k, degree)
        step = rows.shape[1] // degree
        return rows[:, rank * step : (rank + 1) * step].contiguous().reshape(-1)
    if kind == "column":
        leaf = slot.name.rsplit(".", 1)[-1]
        parts = fused_parts(cfg, slot.name) if leaf in COLUMN_PARALLEL else (t.shape[0],)
        return column_shard(t, parts, rank, degree)
    return row_shard(t, rank, degree)


def shard_layout(full: WeightLayout, cfg: ModelConfig, degree: int) -> WeightLayout:
    """The layout of one shard: the same slots (and matrix groups) with 1/degree of the split dimension.

    Refuses (``ModelLoadError``) a split that would cut a row-parallel quantized matrix inside a block."""
    if full.planar:
        raise RuntimeError("shard the GGUF blocks before make_planar")
    kinds = slot_kinds(full)
    lay = WeightLayout(full.dtype, full.quantized, groups=dict(full.groups))
    for s in full.slots.values():
        shape = list(s.shape)
        kind = kinds[s.name]
        if kind == "column":
            if shape[0] % degree:
                raise ModelLoadError(f"{s.name}: {shape[0]} rows do not split into {degree} shards")
            shape[0] //= degree
        elif kind == "row":
            if s.ggml_type is not None:
                check_block_split(s.ggml_type, shape[1], degree)
            elif shape[1] % degree:
                raise ModelLoadError(f"{s.name}: {shape[1]} input columns do not split into {degree} shards")
            shape[1] //= degree
        if s.ggml_type is not None:
            n_bytes = shape[0] * row_bytes(s.ggml_type, shape[1])
        else:
            n = 1
            for d in shape:
                n *= d
            n_bytes = n * full.dtype.itemsize
        lay._reserve(Slot(s.name, tuple(shape), lay.total_bytes, n_bytes, s.ggml_type))
    return lay


@torch.no_grad()
def shard_arena(
    arena: torch.Tensor, full: WeightLayout, cfg: ModelConfig, rank: int, degree: int
) -> tuple[torch.Tensor, WeightLayout]:
    """A new arena holding only rank ``rank``'s slices of the full ``arena``: the slice-after-upload form,
    kept as the reference ``ShardSink``'s streamed shard is tested against (the engine streams)."""
    lay = shard_layout(full, cfg, degree)
    kinds = slot_kinds(full)
    out = torch.empty(lay.total_bytes, dtype=torch.uint8, device=arena.device)
    src, dst = views(arena, full), views(out, lay)
    for name, view in dst.items():
        view.copy_(shard_tensor(src[name], full.slots[name], kinds[name], cfg, rank, degree))
    return out, lay


STAGING_ROUND = 2 << 20  # the caching allocator's granularity for large blocks


def _staged_bytes(slot: Slot) -> int:
    return -(-slot.n_bytes // STAGING_ROUND) * STAGING_ROUND


def staging_peak_bytes(full: WeightLayout, g: GGUFFile) -> int:
    """The most ``ShardSink`` holds in full-size staging at once: split slots open in file order
    (opened by their first tensor, dropped after their last), from the header alone."""
    kinds = slot_kinds(full)
    left: dict[str, int] = {}
    for part in full.parts.values():
        left[part.slot] = left.get(part.slot, 0) + 1
    held = peak = 0
    opened: set[str] = set()
    for t in sorted(g.tensors, key=lambda t: t.data_offset):
        part = full.parts.get(t.name)
        if part is None or kinds[part.slot] == "replicated":
            continue
        slot = full.slots[part.slot]
        if slot.name not in opened:
            opened.add(slot.name)
            held += _staged_bytes(slot)
            peak = max(peak, held)
        left[slot.name] -= 1
        if not left[slot.name]:
            held -= _staged_bytes(slot)
    return peak


class ShardSink:
    """``upload``'s sink for one rank: the shard arena's slots, split ones staged whole and sliced
    when complete (see the module docstring). ``finish`` checks every slot was written in full."""

    def __init__(self, shard: torch.Tensor, full: WeightLayout, cfg: ModelConfig, rank: int, degree: int) -> None:
        self.full, self.cfg, self.rank, self.degree = full, cfg, rank, degree
        self.lay = shard_layout(full, cfg, degree)
        if shard.numel() != self.lay.total_bytes:
            raise ValueError(f"shard arena is {shard.numel()} bytes, its layout {self.lay.total_bytes}")
        self.kinds = slot_kinds(full)
        self._dst = views(shard, self.lay)
        self._staged: dict[str, torch.Tensor] = {}
        self._left = {name: self._numel(s) for name, s in full.slots.items()}
        self.staged_bytes = self.peak_staged_bytes = 0

    def _numel(self, s: Slot) -> int:
        return s.n_bytes if s.ggml_type is not None else s.n_bytes // self.full.dtype.itemsize

    def target(self, slot: str) -> torch.Tensor:
        if self.kinds[slot] == "replicated":
            return self._dst[slot].view(-1)
        buf = self._staged.get(slot)
        if buf is None:
            s = self.full.slots[slot]
            dtype = torch.uint8 if s.ggml_type is not None else self.full.dtype
            buf = self._staged[slot] = torch.empty(self._numel(s), dtype=dtype, device=self._dst[slot].device)
            self.staged_bytes += _staged_bytes(s)
            self.peak_staged_bytes = max(self.peak_staged_bytes, self.staged_bytes)
        return buf

    def written(self, slot: str, n: int) -> None:
        self._left[slot] -= n
        if self._left[slot] < 0:
            raise ModelLoadError(f"{slot}: more values written than the slot holds")
        if self._left[slot] or self.kinds[slot] == "replicated":
            return
        s = self.full.slots[slot]
        buf = self._staged.pop(slot)
        whole = buf if s.ggml_type is not None else buf.view(s.shape)
        self._dst[slot].copy_(shard_tensor(whole, s, self.kinds[slot], self.cfg, self.rank, self.degree))
        self.staged_bytes -= _staged_bytes(s)

    def finish(self) -> WeightLayout:
        """The shard's layout, once every slot of the full layout has been written in full."""
        short = [name for name, left in self._left.items() if left]
        if short or self._staged:
            raise ModelLoadError(f"{len(short)} weight slot(s) were not fully streamed, e.g. {short[:3]}")
        return self.lay
