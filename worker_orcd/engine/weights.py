"""Resident weights: where every GGUF tensor lands in VRAM, checked against the file (SPEC 4100).

All weights live in ONE device allocation (the arena): one pointer to
attest, one buffer for the GPU fingerprint kernel, and an exact
``vram_bytes``; ``upload.py`` streams the bytes in.

Two residencies:

* quantized (CUDA): every matrix (Q/K/V, O, gate/up/down, embedding, output
  head) stays as the file's GGUF blocks, byte for byte, except that Q8_0 and
  Q6_K blocks are then split into aligned planes (``qlayout``, same bytes,
  ``make_planar``), and is bound as a ``QWeight``; Q/K/V and gate/up become
  ``WeightGroup``s (their parts may have different types: Q4_K_M mixes Q4_K and Q6_K) that the fused
  dequant-matmul kernel writes into one output. Norm weights and biases (tiny)
  are dequantized at load to the resident dtype. The seal fingerprints the
  arena, i.e. exactly the verified file bytes that are resident. A matrix whose
  type has no fused kernel (Q2_K, Q3_K: ``formats.DEQUANTIZED_AT_LOAD_TYPES``) is
  dequantized at load into its own dense slot, per tensor: alone it is bound
  as a dense tensor, inside a group as a ``QWeight`` of the float type, so
  a Q3_K_M group mixing Q3_K and Q5_K keeps its Q5_K part as blocks.
* dense (CPU dev mode): everything dequantized to fp32 at load, Q/K/V and
  gate/up fused into one matrix each (one GEMM instead of 3 and 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError
from ..gguf import GGUFFile
from .config import ModelConfig
from ..gguf.constants import BLOCK_LAYOUT, GGMLType
from .dequant import SUPPORTED_TYPES
from .device import DeviceContext
from .qlayout import PLANAR_TYPES, fragments_fit, q8_fragments_fit, repack_fragments, repack_planar
from .qweight import FUSED_TYPES, QWeight, Weight, WeightGroup

ARENA_ALIGN = 256  # bytes; cuBLAS and vectorised Triton loads want >= 16


def resident_dtype(cfg: ModelConfig, ctx: DeviceContext) -> torch.dtype:
    """fp16 on the GPU: 10-bit mantissa (bf16 has 7), full-rate tensor cores, and Qwen2.5's
    residual stream stays far inside its range (max |x| ~1e3 measured on 0.5B). bf16 for Gemma 3,
    whose residual stream exceeds fp16's 65504 (~1.04e5 measured on 270M; Google ships bf16).
    fp32 on the CPU (the reference numerics)."""
    if ctx.dev_mode:
        return torch.float32
    return torch.bfloat16 if cfg.arch == "gemma3" else torch.float16


@dataclass(frozen=True)
class Slot:
    """One resident tensor: a typed view of ``[byte_offset, byte_offset + n_bytes)`` of the arena."""

    name: str
    shape: tuple[int, ...]
    byte_offset: int
    n_bytes: int
    ggml_type: GGMLType | None = None  # None: dense at the layout's dtype; else raw GGUF blocks [N, K]


@dataclass(frozen=True)
class Part:
    """One GGUF tensor and where its elements land: ``slot``'s flat elements from ``elem_offset``."""

    tensor: str
    slot: str
    elem_offset: int
    ggml_shape: tuple[int, ...]


@dataclass
class WeightLayout:
    dtype: torch.dtype
    quantized: bool = False
    slots: dict[str, Slot] = field(default_factory=dict)
    parts: dict[str, Part] = field(default_factory=dict)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # matrix -> its raw slots (quantized)
    total_bytes: int = 0
    planar: bool = False  # PLANAR_TYPES slots in qlayout's planes (decided: ``plan_planar``)
    fragment_types: frozenset[GGMLType] = frozenset()  # matrix slots of these types in fragment order (``plan_planar``)
    repacked: bool = False  # the arena's bytes are in that order (``make_planar``)

    def in_fragments(self, s: Slot) -> bool:
        """Whether slot ``s`` holds its weight in fragment order (not an untied embedding: a lookup table only)."""
        if s.ggml_type not in self.fragment_types or s.name == "token_embd.weight" and "lm_head" in self.groups:
            return False  # an untied embedding is only looked up; a tied one is the output head too
        fit = q8_fragments_fit if s.ggml_type == GGMLType.Q8_0 else fragments_fit
        return fit(s.shape[0], s.shape[1])

    def _reserve(self, slot: Slot) -> None:
        self.slots[slot.name] = slot
        self.total_bytes += -(-slot.n_bytes // ARENA_ALIGN) * ARENA_ALIGN

    def matrix(self, g: GGUFFile, name: str, shape: tuple[int, int], *sources: tuple[str, tuple[int, ...]]) -> None:
        """A matrix weight: fused dense (``add``) or, quantized, one raw slot per source tensor."""
        if not self.quantized:
            self.add(name, shape, *sources)
            return
        names = []
        for tensor, ggml_shape in sources:
            if not g.has_tensor(tensor):
                raise ModelLoadError(f"tensor {tensor} is missing from the GGUF file")
            t = g.tensor(tensor).ggml_type
            if t not in FUSED_TYPES:  # dequantized at load (unsupported types: refused by the check)
                self.add(tensor, (ggml_shape[1], ggml_shape[0]), (tensor, ggml_shape))
            else:
                t = GGMLType(t)
                layout = BLOCK_LAYOUT[t]
                n = ggml_shape[0] * ggml_shape[1] // layout.block_size * layout.type_size
                self._reserve(Slot(tensor, (ggml_shape[1], ggml_shape[0]), self.total_bytes, n, t))
                self.parts[tensor] = Part(tensor, tensor, 0, ggml_shape)
            names.append(tensor)
        self.groups[name] = tuple(names)

    def add(self, name: str, shape: tuple[int, ...], *sources: tuple[str, tuple[int, ...]]) -> None:
        """Reserve ``name`` (torch shape) filled by ``sources`` (GGUF name, ggml shape) in order."""
        n = 1
        for d in shape:
            n *= d
        self._reserve(Slot(name, shape, self.total_bytes, n * self.dtype.itemsize))
        off = 0
        for tensor, ggml_shape in sources:
            self.parts[tensor] = Part(tensor, name, off, ggml_shape)
            count = 1
            for d in ggml_shape:
                count *= d
            off += count
        assert off == n, f"{name}: parts fill {off} of {n} elements"


def weight_layout(cfg: ModelConfig, g: GGUFFile, dtype: torch.dtype, quantized: bool = False) -> WeightLayout:
    """Where every weight goes, checked against the file's tensors (names, shapes, types).

    ``quantized``: matrices stay GGUF blocks (the CUDA engine); else dense ``dtype`` (CPU dev mode)."""
    d, V, f, q, kv, hd = cfg.d_model, cfg.vocab_size, cfg.ffn_dim, cfg.q_dim, cfg.kv_dim, cfg.head_dim
    lay = WeightLayout(dtype, quantized)
    lay.matrix(g, "embed", (V, d), ("token_embd.weight", (d, V)))
    if not cfg.tied_embeddings:
        lay.matrix(g, "lm_head", (V, d), ("output.weight", (d, V)))
    lay.add("norm", (d,), ("output_norm.weight", (d,)))
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        lay.add(f"{i}.attn_norm", (d,), (b + "attn_norm.weight", (d,)))
        lay.matrix(
            g,
            f"{i}.wqkv",
            (q + 2 * kv, d),
            (b + "attn_q.weight", (d, q)),
            (b + "attn_k.weight", (d, kv)),
            (b + "attn_v.weight", (d, kv)),
        )
        if cfg.qkv_bias:
            lay.add(
                f"{i}.bqkv",
                (q + 2 * kv,),
                (b + "attn_q.bias", (q,)),
                (b + "attn_k.bias", (kv,)),
                (b + "attn_v.bias", (kv,)),
            )
        if cfg.qk_norm:
            lay.add(f"{i}.q_norm", (hd,), (b + "attn_q_norm.weight", (hd,)))
            lay.add(f"{i}.k_norm", (hd,), (b + "attn_k_norm.weight", (hd,)))
        lay.matrix(g, f"{i}.wo", (d, q), (b + "attn_output.weight", (q, d)))
        if cfg.post_norms:
            lay.add(f"{i}.post_attn_norm", (d,), (b + "post_attention_norm.weight", (d,)))
        lay.add(f"{i}.ffn_norm", (d,), (b + "ffn_norm.weight", (d,)))
        lay.matrix(g, f"{i}.w_gate_up", (2 * f, d), (b + "ffn_gate.weight", (d, f)), (b + "ffn_up.weight", (d, f)))
        lay.matrix(g, f"{i}.w_down", (d, f), (b + "ffn_down.weight", (f, d)))
        if cfg.post_norms:
            lay.add(f"{i}.post_ffn_norm", (d,), (b + "post_ffw_norm.weight", (d,)))
    _check_against_file(lay, g)
    return lay


def _check_against_file(lay: WeightLayout, g: GGUFFile) -> None:
    for part in lay.parts.values():
        if not g.has_tensor(part.tensor):
            raise ModelLoadError(f"tensor {part.tensor} is missing from the GGUF file")
        info = g.tensor(part.tensor)
        if tuple(info.shape) != part.ggml_shape:
            raise ModelLoadError(f"tensor {part.tensor} has shape {list(info.shape)}, expected {list(part.ggml_shape)}")
        if info.ggml_type not in SUPPORTED_TYPES:
            names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise ModelLoadError(
                f"tensor {part.tensor} has type {info.ggml_type.name}, which the engine cannot dequantize (supported: {names})"
            )
    unknown = [t.name for t in g.tensors if t.name not in lay.parts]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise ModelLoadError(
            f"{len(unknown)} tensor(s) the {g.architecture} forward pass does not use: {shown}; refusing rather than ignoring them"
        )


# --- resident tensors ------------------------------------------------------------------------


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wqkv: Weight
    bqkv: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    wo: Weight
    post_attn_norm: torch.Tensor | None
    ffn_norm: torch.Tensor
    w_gate_up: Weight
    w_down: Weight
    post_ffn_norm: torch.Tensor | None


@dataclass
class ModelWeights:
    arena: torch.Tensor  # uint8, every weight is a view of it
    embed: Weight
    lm_head: Weight
    norm: torch.Tensor
    layers: list[LayerWeights]
    dtype: torch.dtype  # of activations and dense weights

    @property
    def n_bytes(self) -> int:
        return self.arena.numel()


def views(arena: torch.Tensor, lay: WeightLayout) -> dict[str, torch.Tensor]:
    """Every slot as a view of the arena: dense slots typed and shaped, raw slots as their bytes."""
    out = {}
    for s in lay.slots.values():
        raw = arena[s.byte_offset : s.byte_offset + s.n_bytes]
        out[s.name] = raw if s.ggml_type is not None else raw.view(lay.dtype).view(s.shape)
    return out


_HALF2_FORMS = {(GGMLType.Q4_K, False), (GGMLType.Q6_K, True)}  # what QWeight.half2 takes
_FLOAT_TYPE = {torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16, torch.float32: GGMLType.F32}


def _matrix(v: dict[str, torch.Tensor], lay: WeightLayout, name: str, half2: bool = False) -> Weight:
    """A quantized-layout matrix: its raw slots as QWeights; a slot dequantized at load is a dense
    tensor alone (dense kernel, plain embedding lookup) and a float-type QWeight inside a group."""
    if name not in lay.groups:
        return v[name]
    slots = [lay.slots[slot_name] for slot_name in lay.groups[name]]
    if len(slots) == 1 and slots[0].ggml_type is None:
        return v[slots[0].name]
    parts = []
    # in-launch segment-sum counters: (rows / 64) * 4 token tiles per fragment-order part, back to back in one tensor
    sizes = [s.shape[0] // 64 * 4 if s.ggml_type is not None and lay.in_fragments(s) else 0 for s in slots]
    all_locks = torch.zeros(sum(sizes), dtype=torch.int32, device=v[slots[0].name].device) if any(sizes) else None
    at = 0
    for s, size in zip(slots, sizes, strict=True):
        if s.ggml_type is None:
            raw = v[s.name].reshape(-1).view(torch.uint8)
            parts.append(QWeight(raw, _FLOAT_TYPE[lay.dtype], s.shape[0], s.shape[1]))
        else:
            frag = lay.in_fragments(s)
            planar = lay.planar and s.ggml_type in PLANAR_TYPES and not frag
            h2 = (half2 and lay.dtype == torch.float16 and s.ggml_type in HALF2_FRAGMENT_TYPES
                  and (frag or (s.ggml_type, planar) in _HALF2_FORMS))
            locks = all_locks[at : at + size] if all_locks is not None and size else None
            parts.append(QWeight(v[s.name], s.ggml_type, s.shape[0], s.shape[1], planar=planar, half2=h2, fragments=frag,
                                 locks=locks))
        at += size
    return parts[0] if len(parts) == 1 else WeightGroup(tuple(parts), locks=all_locks)


FRAGMENT_TYPES = frozenset({GGMLType.Q8_0})  # in fragment order in an fp16 model (the same values either way)
HALF2_FRAGMENT_TYPES = frozenset({GGMLType.Q4_K, GGMLType.Q6_K})  # too, under quantized-half2 (half2 values)


def plan_planar(lay: WeightLayout, half2: bool = False) -> None:
    """Decide the resident order ``make_planar`` will give the bytes (which slots become fragment order or
    planes) without touching them: ``bind`` needs only this, so the model binds and the engine warms up and
    captures its graphs while the file still streams in (their outputs on not-yet-final bytes are dropped)."""
    if lay.planar:
        return
    if lay.dtype == torch.float16:
        lay.fragment_types = FRAGMENT_TYPES | (HALF2_FRAGMENT_TYPES if half2 else frozenset())
    lay.planar = True


def make_planar(arena: torch.Tensor, lay: WeightLayout, half2: bool = False) -> None:
    """After the hashed upload, in place: in an fp16 model every Q8_0 matrix slot (and under ``half2``,
    ``quantized-half2``, every Q4_K/Q6_K one) that fits becomes the tensor core's fragment order
    (``kernels/fragments.py``); the other PLANAR_TYPES slots ``qlayout``'s planes (the aligned layout
    ``qmatmul_tiled`` reads), as ``plan_planar`` decided (called here if it was not). The seal then
    fingerprints what is resident."""
    if lay.repacked:
        raise RuntimeError("the arena is already planar")
    plan_planar(lay, half2)
    for s in lay.slots.values():
        raw = arena[s.byte_offset : s.byte_offset + s.n_bytes]
        if lay.in_fragments(s):
            repack_fragments(raw, s.ggml_type, s.shape[0], s.shape[1])
        elif s.ggml_type in PLANAR_TYPES:
            repack_planar(raw, s.ggml_type, s.shape[0], s.shape[1])
    lay.repacked = True


def bind(arena: torch.Tensor, lay: WeightLayout, cfg: ModelConfig, half2: bool = False) -> ModelWeights:
    """The model's tensors as views of the arena; ``half2``: Q4_K/Q6_K matrices of an fp16 model are
    dequantized in packed half2 arithmetic by the kernels (QWeight.half2)."""
    v = views(arena, lay)
    for name in lay.groups:
        v[name] = _matrix(v, lay, name, half2)  # type: ignore[assignment]
    layers = [
        LayerWeights(
            attn_norm=v[f"{i}.attn_norm"],
            wqkv=v[f"{i}.wqkv"],
            bqkv=v.get(f"{i}.bqkv"),
            q_norm=v.get(f"{i}.q_norm"),
            k_norm=v.get(f"{i}.k_norm"),
            wo=v[f"{i}.wo"],
            post_attn_norm=v.get(f"{i}.post_attn_norm"),
            ffn_norm=v[f"{i}.ffn_norm"],
            w_gate_up=v[f"{i}.w_gate_up"],
            w_down=v[f"{i}.w_down"],
            post_ffn_norm=v.get(f"{i}.post_ffn_norm"),
        )
        for i in range(cfg.n_layers)
    ]
    return ModelWeights(arena, v["embed"], v.get("lm_head", v["embed"]), v["norm"], layers, lay.dtype)
