"""One step's per-row sampling parameters, held on the host as columns: what the batched sampler launches from.

Columns (one entry per row), not objects: the launcher packs them with numpy into one
buffer and copies it to the device once per step. They stay on the host because they
decide the launches (which rows need a top-k or a sort, how wide): reading them back
from the device would cost a sync per step. Triton-free, so the CPU mode can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .kernels import validate as v

KERNEL = "sample_batch"
_U64 = 2**64


@dataclass(frozen=True)
class RowParams:
    """One row's settings, as ``kernels.sampling.sample`` takes them plus the runner's extras."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    step: int = 0
    penalty_ids: Sequence[int] = ()  # ids the repetition penalty applies to (each once)
    generated_ids: Sequence[int] = ()  # ids counted by the presence/frequency penalties
    allowed: object | None = None  # packed int32 bitmask (bit t%32 of word t//32); None: no constraint


@dataclass(frozen=True)
class SampleRows:
    """Per-row sampling parameters of R rows (CPU tensors; float64 so Python floats stay exact)."""

    temperature: torch.Tensor  # [R] float64, 0 = greedy
    top_k: torch.Tensor  # [R] int64, 0 = off
    top_p: torch.Tensor  # [R] float64, 1 = off
    min_p: torch.Tensor  # [R] float64, 0 = off
    repetition_penalty: torch.Tensor  # [R] float64, 1 = off
    presence_penalty: torch.Tensor  # [R] float64
    frequency_penalty: torch.Tensor  # [R] float64
    seed: torch.Tensor  # [R] uint64
    step: torch.Tensor  # [R] uint64
    penalty_offsets: torch.Tensor  # [R+1] int64: row r's penalty ids are penalty_ids[o[r]:o[r+1]]
    penalty_ids: torch.Tensor  # [N] int32 or int64
    generated_offsets: torch.Tensor  # [R+1] int64, CSR like penalty_offsets
    generated_ids: torch.Tensor  # [G] int32 or int64
    allowed: torch.Tensor | None = None  # [R, ceil(V/32)] int32 packed bitmask
    has_mask: torch.Tensor | None = None  # [R] bool: the rows whose ``allowed`` row applies

    @staticmethod
    def stack(rows: Sequence[RowParams], vocab: int) -> SampleRows:
        """Columns from per-row settings; a bitmask is cut or zero-padded to ceil(vocab/32) words
        (ids past a short mask are disallowed, as the per-row path has it)."""
        for i, r in enumerate(rows):
            for name in ("top_k", "seed", "step"):
                value = getattr(r, name)
                if isinstance(value, bool) or not isinstance(value, int):
                    v.fail_param(KERNEL, name, f"row {i}: must be an int, got {value!r}")
            for name in ("seed", "step"):
                if not 0 <= getattr(r, name) < _U64:
                    v.fail_param(KERNEL, name, f"row {i}: must be in [0, 2^64), got {getattr(r, name)!r}")

        def f64(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array([getattr(r, name) for r in rows], dtype=np.float64))

        def csr(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            lists = [np.asarray(getattr(r, name), dtype=np.int64).reshape(-1) for r in rows]
            offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum([a.size for a in lists], out=offsets[1:])
            ids = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
            return torch.from_numpy(offsets), torch.from_numpy(ids)

        allowed = has_mask = None
        if any(r.allowed is not None for r in rows):
            width = -(-vocab // 32)
            words = np.zeros((len(rows), width), dtype=np.int32)
            for i, r in enumerate(rows):
                if r.allowed is not None:
                    w = np.asarray(r.allowed, dtype=np.int32).reshape(-1)[:width]
                    words[i, : w.size] = w
            allowed = torch.from_numpy(words)
            has_mask = torch.tensor([r.allowed is not None for r in rows], dtype=torch.bool)
        penalty_offsets, penalty_ids = csr("penalty_ids")
        generated_offsets, generated_ids = csr("generated_ids")
        return SampleRows(
            temperature=f64("temperature"),
            top_k=torch.tensor([r.top_k for r in rows], dtype=torch.int64),
            top_p=f64("top_p"),
            min_p=f64("min_p"),
            repetition_penalty=f64("repetition_penalty"),
            presence_penalty=f64("presence_penalty"),
            frequency_penalty=f64("frequency_penalty"),
            seed=torch.from_numpy(np.array([r.seed for r in rows], dtype=np.uint64)),
            step=torch.from_numpy(np.array([r.step for r in rows], dtype=np.uint64)),
            penalty_offsets=penalty_offsets,
            penalty_ids=penalty_ids,
            generated_offsets=generated_offsets,
            generated_ids=generated_ids,
            allowed=allowed,
            has_mask=has_mask,
        )

    def row(self, r: int) -> dict[str, object]:
        """Row r's scalars as Python values (the per-row path's arguments)."""
        return {
            "temperature": float(self.temperature[r]),
            "top_k": int(self.top_k[r]),
            "top_p": float(self.top_p[r]),
            "min_p": float(self.min_p[r]),
            "repetition_penalty": float(self.repetition_penalty[r]),
            "presence_penalty": float(self.presence_penalty[r]),
            "frequency_penalty": float(self.frequency_penalty[r]),
            "seed": int(self.seed.numpy()[r]),  # numpy: torch reads a uint64 element as int64
            "step": int(self.step.numpy()[r]),
        }


_FLOAT_COLUMNS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _column(rows: SampleRows, name: str, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    t = v.tensor(KERNEL, name, getattr(rows, name))
    v.dtype(KERNEL, name, t, (dtype,))
    v.shape(KERNEL, name, t, (n_rows,))
    v.check(t.device.type == "cpu", KERNEL, name, f"must be a host (cpu) tensor: it decides the launches, got {t.device}")
    return t


def _csr(rows: SampleRows, name: str, n_rows: int) -> None:
    off = _column(rows, f"{name}_offsets", n_rows + 1, torch.int64)
    ids = v.tensor(KERNEL, f"{name}_ids", getattr(rows, f"{name}_ids"))
    v.rank(KERNEL, f"{name}_ids", ids, 1)
    v.dtype(KERNEL, f"{name}_ids", ids, v.INDEX_DTYPES)
    v.check(ids.device.type == "cpu", KERNEL, f"{name}_ids", f"must be a host (cpu) tensor, got {ids.device}")
    o = off.numpy()
    ok = o[0] == 0 and o[-1] == ids.shape[0] and bool(np.all(np.diff(o) >= 0))
    v.check(ok, KERNEL, f"{name}_offsets", f"must rise from 0 to len({name}_ids) = {ids.shape[0]}, got {o.tolist()[:8]}...")


def check_logits(logits: object) -> tuple[int, int]:
    """logits [R, V], floating point, unit last stride: (R, V)."""
    logits = v.tensor(KERNEL, "logits", logits)
    v.rank(KERNEL, "logits", logits, 2)
    v.positive_dims(KERNEL, "logits", logits)
    v.dtype(KERNEL, "logits", logits, v.FLOAT_DTYPES)
    v.unit_last_stride(KERNEL, "logits", logits)
    return int(logits.shape[0]), int(logits.shape[1])


def check_rows(rows: object, n_rows: int, vocab: int) -> SampleRows:
    """Every column's shape, dtype and range (typed errors naming the column and the row), before any launch."""
    if not isinstance(rows, SampleRows):
        v.fail(KERNEL, "rows", f"must be a SampleRows, got {type(rows).__name__}")
    for name in _FLOAT_COLUMNS:
        _column(rows, name, n_rows, torch.float64)
    _column(rows, "top_k", n_rows, torch.int64)
    _column(rows, "seed", n_rows, torch.uint64)
    _column(rows, "step", n_rows, torch.uint64)
    _csr(rows, "penalty", n_rows)
    _csr(rows, "generated", n_rows)
    if (rows.allowed is None) != (rows.has_mask is None):
        v.fail(KERNEL, "has_mask", "allowed and has_mask come together (both or neither)")
    if rows.allowed is not None:
        allowed = v.tensor(KERNEL, "allowed", rows.allowed)
        v.dtype(KERNEL, "allowed", allowed, (torch.int32,))
        v.shape(KERNEL, "allowed", allowed, (n_rows, -(-vocab // 32)))
        v.check(allowed.device.type == "cpu", KERNEL, "allowed", f"must be a host (cpu) tensor, got {allowed.device}")
        _column(rows, "has_mask", n_rows, torch.bool)

    def bad(name: str, ok: np.ndarray, rule: str) -> None:
        if not ok.all():
            r = int(np.flatnonzero(~ok)[0])
            v.fail_param(KERNEL, name, f"row {r}: {rule}, got {getattr(rows, name)[r].item()!r}")

    cols = {name: getattr(rows, name).numpy() for name in _FLOAT_COLUMNS}
    for name, col in cols.items():
        bad(name, np.isfinite(col), "must be a finite number")
    bad("temperature", (cols["temperature"] >= 0) & (cols["temperature"] <= 2), "must be in [0, 2]")
    bad("top_k", rows.top_k.numpy() >= 0, "must be an int >= 0 (0 = off)")
    bad("top_p", (cols["top_p"] > 0) & (cols["top_p"] <= 1), "must be in (0, 1]")
    bad("min_p", (cols["min_p"] >= 0) & (cols["min_p"] < 1), "must be in [0, 1)")
    bad("repetition_penalty", cols["repetition_penalty"] > 0, "must be > 0")
    return rows


def ln_min_p(min_p: np.ndarray) -> np.ndarray:
    """ln(min_p) in float64 by ``math.log``, as the per-row launcher computes it (numpy's log may differ by an ulp)."""
    return np.array([math.log(m) if m > 0.0 else 0.0 for m in min_p.tolist()], dtype=np.float64)
