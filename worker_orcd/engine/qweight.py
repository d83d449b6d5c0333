"""A matrix weight as it is resident: GGUF block bytes (any ``FUSED_TYPES`` type), plus mixed-type groups.

``QWeight`` is W[N, K] (torch orientation: N output features, rows of K
inputs) kept as the file's blocks, row after row (a GGUF tensor of ggml shape
(K, N) is exactly that). ``WeightGroup`` is several of them stacked along N
(fused Q/K/V, gate/up): in a Q4_K_M file the parts have different types, so
each part keeps its own bytes and the matmul writes each part's columns of
one output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dequant.formats import FUSED_TYPES
from .qlayout import (PLANAR_TYPES, fragment_rows, fragments_fit, from_fragments, from_planes, plane_rows,
                      q6k_fragment_rows, q6k_from_fragments, q8_fragment_rows, q8_fragments_fit, q8_from_fragments)
from ..gguf.constants import BLOCK_LAYOUT, GGMLType

__all__ = ["FUSED_TYPES", "QWeight", "Weight", "WeightGroup", "row_bytes"]  # FUSED_TYPES: re-exported (torch-free home)


def row_bytes(ggml_type: GGMLType, k: int) -> int:
    """Bytes of one row of ``k`` elements (``k`` a multiple of the block size)."""
    layout = BLOCK_LAYOUT[ggml_type]
    if k % layout.block_size:
        raise ValueError(f"{ggml_type.name}: row length {k} is not a multiple of {layout.block_size}")
    return k // layout.block_size * layout.type_size


@dataclass(frozen=True)
class QWeight:
    """W[N, K] as GGUF blocks: ``raw`` is uint8 [N * row_bytes], row n at n * row_bytes.

    ``planar``: a PLANAR_TYPES weight repacked by ``qlayout`` (each block field in its own plane, same bytes)."""

    raw: torch.Tensor
    ggml_type: GGMLType
    n: int
    k: int
    planar: bool = False
    # Q4_K/Q6_K (fp16 activations): dequantized in packed half2 arithmetic, fp16(d*sc) * q - fp16(dmin*m)
    # with one fp16 rounding (kernels/qmatmul_tiled.py), by every kernel that multiplies by this weight;
    # otherwise ggml's fp32 arithmetic rounded once (the dense residency's values)
    half2: bool = False
    # stored in the tensor core's fragment order (qlayout, kernels/fragments.py; same size): Q4_K/Q6_K with half2
    # values, Q8_0 with ggml's
    fragments: bool = False
    # fragment order: zeroed int32 counters, one per (64-row group, token tile of a decode launch), with which the
    # last K segment of a tile to finish adds the segments inside the launch (kernels/fragments.py); None: a
    # second launch adds them. They belong to the weight (its lifetime; the kernel leaves them zeroed).
    locks: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        want = self.n * row_bytes(self.ggml_type, self.k)
        if self.raw.dtype != torch.uint8 or self.raw.dim() != 1 or self.raw.numel() != want:
            raise ValueError(
                f"QWeight {self.ggml_type.name} [{self.n}, {self.k}]: raw must be uint8 [{want}], "
                f"got {self.raw.dtype} {tuple(self.raw.shape)}"
            )
        if self.planar and self.ggml_type not in PLANAR_TYPES:
            raise ValueError(f"QWeight {self.ggml_type.name}: no planar layout for this type")
        if self.half2 and not (self.ggml_type == GGMLType.Q4_K and not self.planar
                               or self.ggml_type == GGMLType.Q6_K and (self.planar or self.fragments)):
            raise ValueError(f"QWeight {self.ggml_type.name} (planar={self.planar}): half2 is for Q4_K and Q6_K (planes or fragments)")
        if self.fragments and not (not self.planar and (
                self.ggml_type in (GGMLType.Q4_K, GGMLType.Q6_K) and self.half2 and fragments_fit(self.n, self.k)
                or self.ggml_type == GGMLType.Q8_0 and not self.half2 and q8_fragments_fit(self.n, self.k))):
            raise ValueError(f"QWeight {self.ggml_type.name} [{self.n}, {self.k}] (half2={self.half2}): fragment order "
                             f"is for half2 Q4_K/Q6_K and for Q8_0 weights with N % 64 == 0")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.ggml_type, self.k)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The block bytes of rows ``idx`` as uint8 [len(idx) * row_bytes] (for an embedding lookup)."""
        if self.planar:
            return plane_rows(self.raw, self.ggml_type, self.n, self.k, idx)
        if self.fragments and self.ggml_type == GGMLType.Q6_K:
            return q6k_fragment_rows(self.raw, self.n, self.k, idx)
        if self.fragments and self.ggml_type == GGMLType.Q8_0:
            return q8_fragment_rows(self.raw, self.n, self.k, idx)
        if self.fragments:
            return fragment_rows(self.raw, self.n, self.k, idx)
        return self.raw.view(self.n, self.row_bytes).index_select(0, idx.reshape(-1)).reshape(-1)

    def gguf_bytes(self) -> torch.Tensor:
        """The matrix as the file's GGUF blocks (undoes the planar and fragment repackings)."""
        if self.fragments and self.ggml_type == GGMLType.Q6_K:
            return q6k_from_fragments(self.raw, self.n, self.k)
        if self.fragments and self.ggml_type == GGMLType.Q8_0:
            return q8_from_fragments(self.raw, self.n, self.k)
        if self.fragments:
            return from_fragments(self.raw, self.n, self.k)
        return from_planes(self.raw, self.ggml_type, self.n, self.k) if self.planar else self.raw

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole matrix [N, K] in ``dtype`` (tests, references, the CPU fallback)."""
        from .dequant import dequantize

        return dequantize(self.gguf_bytes(), self.ggml_type, self.n * self.k, dtype).view(self.n, self.k)


@dataclass(frozen=True)
class WeightGroup:
    """Parts stacked along N: y[:, off_i : off_i + n_i] = x @ part_i.T (one launch per part, or one for a run of
    same-type fragment-order parts: ``kernels/fragments.parts_fit``)."""

    parts: tuple[QWeight, ...]
    # the parts' in-launch segment-sum counters back to back (each part's ``locks`` is its slice), so a run of
    # parts in one launch has its counters too (weights.bind)
    locks: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.parts or len({p.k for p in self.parts}) != 1:
            raise ValueError("WeightGroup needs at least one part, all with the same K")

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.n for p in self.parts), self.parts[0].k)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts])


Weight = torch.Tensor | QWeight | WeightGroup
