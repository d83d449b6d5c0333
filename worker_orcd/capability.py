"""Capability matching: the model's MCD must lie within the engine's ECP (SPEC 4003, 4600-4623).

The MCD (Model Capability Descriptor) says what running a model *needs*; it is
derived from the GGUF header and may be completed by a sidecar JSON
(``<model path>.mcd.json``). The ECP (Engine Capability Profile) says what this
worker *really runs* (``worker_orcd.engine.profile``). ``match`` applies every
rule and reports every failure, so an operator fixes all of them in one go;
nothing ever falls back silently to a variant the model was not trained with.

Rules (``Rejection.rule``):

* ``positional``   SPEC: the model's positional encoding is supported.
* ``attention``    SPEC: its attention layout (mha/gqa/mqa) is supported.
* ``quant``        SPEC: at least one of its tensor types is supported.
* ``context``      SPEC: its trained context length ``context_max`` is at most
  the engine's ``max_context``. A model trained for a longer context is
  refused even though it could run with a shorter window: the SPEC asks for
  rejection, and a quietly truncated window would be a silent fallback.
* ``quant_all``    extension: *every* tensor type is supported. The SPEC's
  any-of rule alone would accept a model whose upload then fails on its
  first unsupported tensor; this rule refuses it before anything is loaded.
* ``architecture`` extension: ``general.architecture`` is one the engine has a
  forward pass for. Positional encoding and attention layout alone do not say
  the engine can build the model's graph.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import CapabilityError, ModelLoadError
from .gguf.constants import GGMLType, Limits
from .gguf.reader import GGUFFile

# --- positional encodings ---------------------------------------------------------------

ROPE_LLAMA = "rope_llama"  # llama.cpp LLAMA_ROPE_TYPE_NORM: rotate consecutive pairs (x[2i], x[2i+1])
ROPE_NEOX = "rope_neox"  # LLAMA_ROPE_TYPE_NEOX: rotate halves (x[i], x[i + n_rot/2])
ROPE_MROPE = "rope_mrope"  # multimodal sectioned RoPE (LLAMA_ROPE_TYPE_MROPE)
ROPE_IMROPE = "rope_imrope"  # interleaved multimodal RoPE (LLAMA_ROPE_TYPE_IMROPE)
ALIBI = "alibi"  # linear attention biases, no rotation
LEARNED_ABSOLUTE = "learned_absolute"  # a position-embedding tensor (GPT-2 style)
NO_POSITIONAL = "none"  # recurrent/state-space models: order is implicit
KNOWN_POSITIONAL = (ROPE_LLAMA, ROPE_NEOX, ROPE_MROPE, ROPE_IMROPE, ALIBI, LEARNED_ABSOLUTE, NO_POSITIONAL)
UNKNOWN_PREFIX = "unknown:"

# GGUF architecture name -> positional variant, after llama.cpp's llama_model_rope_type().
# Mistral 7B-style GGUFs declare "llama" and so get rope_llama; every name here is a
# general.architecture string exactly as llama.cpp's converter writes it.
_ROPE_LLAMA_ARCHS = (
    "llama", "llama4", "deci", "baichuan", "starcoder", "internlm2", "minicpm", "xverse",
    "command-r", "cohere2", "olmo", "arctic", "deepseek", "deepseek2", "plm", "chatglm", "glm4",
    "granite", "granitemoe", "granitehybrid", "chameleon", "bailingmoe", "smollm3", "arcee",
    "ernie4_5", "ernie4_5-moe", "mistral3", "llada",
)  # fmt: skip
_ROPE_NEOX_ARCHS = (
    "falcon", "falcon-h1", "grok", "dbrx", "bert", "nomic-bert", "nomic-bert-moe", "modern-bert",
    "jina-bert-v3", "stablelm", "bitnet", "qwen", "qwen2", "qwen2moe", "qwen3", "qwen3moe",
    "qwen3next", "dream", "olmo2", "olmoe", "phi2", "phi3", "phimoe", "plamo", "plamo2", "gemma",
    "gemma2", "gemma3", "gemma3n", "gemma-embedding", "starcoder2", "openelm", "gptneox",
    "codeshell", "orion", "nemotron", "exaone", "exaone4", "minicpm3", "bailingmoe2", "dots1",
    "hunyuan-moe", "hunyuan-dense", "gpt-oss", "lfm2", "lfm2moe", "smallthinker", "seed_oss",
    "apertus", "minimax-m2", "glm4moe", "llada-moe",
)  # fmt: skip
_ALIBI_ARCHS = ("bloom", "mpt", "refact", "jais", "jina-bert-v2")
_LEARNED_ARCHS = ("gpt2",)
_NO_POSITIONAL_ARCHS = ("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7")
_MROPE_ARCHS = ("qwen2vl",)
_IMROPE_ARCHS = ("qwen3vl", "qwen3vlmoe")

POSITIONAL_BY_ARCH: dict[str, str] = {
    **dict.fromkeys(_ROPE_LLAMA_ARCHS, ROPE_LLAMA),
    **dict.fromkeys(_ROPE_NEOX_ARCHS, ROPE_NEOX),
    **dict.fromkeys(_ALIBI_ARCHS, ALIBI),
    **dict.fromkeys(_LEARNED_ARCHS, LEARNED_ABSOLUTE),
    **dict.fromkeys(_NO_POSITIONAL_ARCHS, NO_POSITIONAL),
    **dict.fromkeys(_MROPE_ARCHS, ROPE_MROPE),
    **dict.fromkeys(_IMROPE_ARCHS, ROPE_IMROPE),
}
# These switch to multimodal RoPE when the file carries non-zero rope sections.
_MROPE_WHEN_SECTIONED = ("glm4", "glm4moe")

MAX_MODEL_ID = 256
MAX_CONTEXT_LIMIT = 1 << 26  # 64 Mi tokens: far past any model, small enough to catch garbage
_ARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_MCD_FIELDS = ("model_id", "positional", "attention", "quant", "context_max", "vocab_size", "architecture")


# --- descriptors ------------------------------------------------------------------------


@dataclass(frozen=True)
class MCD:
    """What a model needs to run (SPEC 4600). ``architecture`` extends the SPEC's fields."""

    model_id: str
    positional: str
    attention: str
    quant: tuple[str, ...]  # sorted unique ggml type names of its tensors
    context_max: int
    vocab_size: int
    architecture: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quant"] = list(self.quant)
        return d


@dataclass(frozen=True)
class ECP:
    """What this worker really runs (SPEC 4610-4611); advertised at startup and in the callback."""

    worker_id: str
    supports_positional: tuple[str, ...]
    supports_attention: tuple[str, ...]
    supports_quant: tuple[str, ...]
    max_context: int
    vram_bytes: int
    supports_architecture: tuple[str, ...]  # extension: graphs the engine can build
    # extension: of supports_quant, the types with no fused matmul, dequantized at load (the rest stay blocks)
    quant_dequantized_at_load: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in (
            "supports_positional",
            "supports_attention",
            "supports_quant",
            "supports_architecture",
            "quant_dequantized_at_load",
        ):
            d[name] = list(d[name])
        return d


@dataclass(frozen=True)
class PartialMCD:
    """What the GGUF header alone says about the MCD.

    ``values``: fields the header states (a sidecar must agree with them).
    ``missing``: field -> the metadata key whose absence leaves it unstated.
    ``defaults``: stand-ins used when neither header nor sidecar states a field
    (the file's stem for ``model_id``, ``unknown:<arch>`` for ``positional``).
    """

    values: Mapping[str, Any]
    missing: Mapping[str, str]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def complete(self) -> MCD:
        """The MCD without a sidecar; ModelLoadError naming each missing key."""
        return merge_sidecar(self, {})


def _missing_message(missing: Mapping[str, str]) -> str:
    parts = [f"{key} (needed for {name})" for name, key in missing.items()]
    return "model metadata lacks " + ", ".join(parts) + "; add it to the GGUF or to a <model>.mcd.json sidecar"


# --- derivation from the GGUF header ---------------------------------------------------------


def _meta_int(gguf: GGUFFile, key: str, *, minimum: int = 1) -> int | None:
    value = gguf.metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelLoadError(f"model metadata {key} must be an integer >= {minimum}, got {_short(value)}")
    return value


def _per_layer(gguf: GGUFFile, key: str) -> list[int] | None:
    """A head count: one integer for all layers, or one per layer (e.g. OpenELM, hybrid models)."""
    value = gguf.metadata.get(key)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ModelLoadError(
            f"model metadata {key} must be a non-negative integer or a per-layer list of them, got {_short(value)}"
        )
    if isinstance(value, list):
        blocks = _meta_int(gguf, f"{gguf.architecture}.block_count")
        if blocks is not None and len(values) != blocks:
            raise ModelLoadError(
                f"model metadata {key} has {len(values)} per-layer entries but block_count is {blocks}"
            )
    return values


def _printable(text: str) -> str:
    """general.name is untrusted: no control characters (log forging), bounded length."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text.strip())
    return clean if len(clean) <= MAX_MODEL_ID else clean[: MAX_MODEL_ID - 3] + "..."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def attention_kind(head_count: Sequence[int], head_count_kv: Sequence[int] | None, key: str) -> str:
    """mha (kv == heads), mqa (one kv head shared by many), gqa (groups in between).

    Scalars come as one-element lists and are broadcast. Layers without attention
    (0 heads or 0 kv heads: recurrent layers of hybrid models) are skipped. Layers
    of different kinds make the model ``gqa``: mha and mqa are its two extremes.
    """
    kv = list(head_count if head_count_kv is None else head_count_kv)
    n = max(len(head_count), len(kv))
    if len(kv) not in (1, n) or len(head_count) not in (1, n):
        raise ModelLoadError(f"model metadata {key}_kv has {len(kv)} per-layer entries but {key} has {len(head_count)}")
    heads = list(head_count) * n if len(head_count) == 1 else list(head_count)
    kv = kv * n if len(kv) == 1 else kv
    kinds: set[str] = set()
    for layer, (h, k) in enumerate(zip(heads, kv, strict=True)):
        if h == 0 or k == 0:
            continue
        if k > h or h % k:
            raise ModelLoadError(
                f"model metadata {key}_kv (layer {layer}: {k}) must divide {key} ({h}); "
                f"query heads are shared by equal groups of kv heads"
            )
        kinds.add("mha" if k == h else "mqa" if k == 1 else "gqa")
    if not kinds:
        return "none"
    return kinds.pop() if len(kinds) == 1 else "gqa"


def positional_kind(gguf: GGUFFile, arch: str) -> str:
    """Positional variant of ``arch`` as llama.cpp runs it; ``unknown:<arch>`` when unlisted."""
    if arch in _MROPE_WHEN_SECTIONED:
        sections = gguf.metadata.get(f"{arch}.rope.dimension_sections")
        if isinstance(sections, list) and any(isinstance(s, int) and s > 0 for s in sections):
            return ROPE_MROPE
    return POSITIONAL_BY_ARCH.get(arch, UNKNOWN_PREFIX + arch)


def _architecture(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch is None:
        raise ModelLoadError("model metadata lacks general.architecture; cannot tell what network this is")
    if not isinstance(arch, str) or not _ARCH_NAME.fullmatch(arch):
        raise ModelLoadError(
            "model metadata general.architecture must be a short name of letters, digits, '_', '.', '-', "
            f"got {_short(arch)}"
        )
    return arch


def mcd_fields(gguf: GGUFFile, model_id: str | None = None) -> PartialMCD:
    """Everything the header says about the MCD; what it cannot say is listed in ``missing``."""
    arch = _architecture(gguf)
    if not gguf.tensors:
        raise ModelLoadError("model has no tensors; a vocabulary-only GGUF cannot be served")
    values: dict[str, Any] = {"architecture": arch, "quant": tuple(sorted({t.type_name for t in gguf.tensors}))}
    missing: dict[str, str] = {}
    defaults: dict[str, Any] = {}

    name = gguf.metadata.get("general.name")
    if isinstance(name, str) and name.strip():
        values["model_id"] = _printable(name)
    else:
        missing["model_id"] = "general.name"
        if model_id:
            defaults["model_id"] = model_id

    positional = positional_kind(gguf, arch)
    if positional.startswith(UNKNOWN_PREFIX):
        defaults["positional"] = positional  # a sidecar may name it; else the positional rule rejects
    else:
        values["positional"] = positional

    head_key = f"{arch}.attention.head_count"
    heads = _per_layer(gguf, head_key)
    if heads is None:
        missing["attention"] = head_key
    else:
        values["attention"] = attention_kind(heads, _per_layer(gguf, f"{head_key}_kv"), head_key)

    ctx_key = f"{arch}.context_length"
    context = _meta_int(gguf, ctx_key)
    if context is None:
        missing["context_max"] = ctx_key
    else:
        values["context_max"] = context

    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        values["vocab_size"] = len(tokens)
    elif (vocab := _meta_int(gguf, f"{arch}.vocab_size")) is not None:
        values["vocab_size"] = vocab
    else:
        missing["vocab_size"] = f"tokenizer.ggml.tokens or {arch}.vocab_size"
    return PartialMCD(values=values, missing=missing, defaults=defaults)


def derive_mcd(gguf: GGUFFile, model_id: str | None = None) -> MCD:
    """MCD from the GGUF header alone.

    ``model_id`` is used only when the file has no ``general.name`` (the loader
    passes the file's stem). Missing required metadata -> ModelLoadError naming the key.
    """
    return mcd_fields(gguf, model_id).complete()


# --- sidecar ---------------------------------------------------------------------------

SIDECAR_SUFFIX = ".mcd.json"
MAX_SIDECAR_BYTES = 64 * 1024
_GGML_NAMES = frozenset(t.name for t in GGMLType)


class Sidecar(BaseModel):
    """``<model>.mcd.json``: MCD fields the GGUF lacks, or restates (then they must agree)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model_id: str | None = Field(default=None, min_length=1, max_length=MAX_MODEL_ID, pattern=r"^[^\x00-\x1f\x7f]+$")
    architecture: str | None = Field(default=None, pattern=_ARCH_NAME.pattern)
    positional: Literal[KNOWN_POSITIONAL] | None = None  # type: ignore[valid-type]
    attention: Literal["mha", "gqa", "mqa"] | None = None
    quant: list[str] | None = Field(default=None, min_length=1, max_length=len(GGMLType))
    context_max: int | None = Field(default=None, ge=1, le=MAX_CONTEXT_LIMIT)
    vocab_size: int | None = Field(default=None, ge=1, le=Limits().max_array_len)

    @field_validator("quant")
    @classmethod
    def _ggml_types(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [q for q in value if q not in _GGML_NAMES]
        if unknown:
            raise ValueError(f"unknown ggml type(s) {unknown}; use names such as Q4_K, Q8_0, F16")
        if len(set(value)) != len(value):
            raise ValueError("lists a type more than once")
        return sorted(value)


def sidecar_path_for(model_path: str | os.PathLike[str]) -> Path:
    path = Path(model_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def validate_sidecar(data: Any, where: str = "sidecar") -> dict[str, Any]:
    """Validate parsed sidecar JSON; returns only the fields it sets (quant sorted)."""
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where} must hold a JSON object, got {type(data).__name__}")
    try:
        model = Sidecar.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors(include_url=False)
        )
        raise ModelLoadError(f"{where} is invalid: {problems}") from None
    return model.model_dump(exclude_none=True)


def load_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a sidecar (a regular file, no symlink, at most 64 KiB, strict JSON)."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        reason = "it is a symlink; a sidecar must be a regular file" if e.errno == errno.ELOOP else e.strerror or e
        raise ModelLoadError(f"sidecar {path} cannot be opened: {reason}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelLoadError(f"sidecar {path} is not a regular file")
        raw = fh.read(MAX_SIDECAR_BYTES + 1)
    if len(raw) > MAX_SIDECAR_BYTES:
        raise ModelLoadError(f"sidecar {path} is larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ModelLoadError(f"sidecar {path} is not valid JSON: {e}") from None
    return validate_sidecar(data, f"sidecar {path}")


def merge_sidecar(mcd_from_file: MCD | PartialMCD, sidecar: Mapping[str, Any]) -> MCD:
    """Fill what the file lacks from the sidecar; where both speak they must agree.

    Stand-ins do not count as the file speaking: a sidecar may replace the
    file-stem ``model_id`` or a positional ``unknown:<arch>`` (the
    ``architecture`` rule still decides whether the engine can run such a model).
    """
    if isinstance(mcd_from_file, MCD):
        values = {name: getattr(mcd_from_file, name) for name in _MCD_FIELDS}
        defaults = {}
        if mcd_from_file.positional.startswith(UNKNOWN_PREFIX):
            defaults["positional"] = values.pop("positional")
        mcd_from_file = PartialMCD(values=values, missing={}, defaults=defaults)
    side = validate_sidecar(dict(sidecar))
    stated = dict(mcd_from_file.values)

    conflicts: list[str] = []
    merged = {**mcd_from_file.defaults, **stated}
    for name, value in side.items():
        value = tuple(value) if name == "quant" else value
        if name in stated and stated[name] != value:
            conflicts.append(f"{name}: GGUF says {_show(stated[name])}, sidecar says {_show(value)}")
        merged[name] = value
    if conflicts:
        raise ModelLoadError("model sidecar disagrees with the GGUF header on " + "; ".join(conflicts))
    unresolved = {name: key for name, key in mcd_from_file.missing.items() if name not in merged}
    if unresolved:
        raise ModelLoadError(_missing_message(unresolved))
    return MCD(**{name: merged[name] for name in _MCD_FIELDS})


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value) if isinstance(value, str) else str(value)


# --- matching -----------------------------------------------------------------------------

RuleName = Literal["positional", "attention", "quant", "context", "quant_all", "architecture"]


@dataclass(frozen=True)
class Rejection:
    rule: RuleName
    required: str
    supported: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class MatchResult:
    rejections: tuple[Rejection, ...]

    @property
    def accepted(self) -> bool:
        return not self.rejections

    @property
    def message(self) -> str:
        return "; ".join(r.message for r in self.rejections)

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "rejections": [r.to_dict() for r in self.rejections]}


def _list(values: Sequence[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _reject(mcd: MCD, rule: RuleName, needs: str, required: str, supported: str) -> Rejection:
    message = f'model "{mcd.model_id}" needs {needs} {required}; this engine supports {supported}'
    return Rejection(rule, required, supported, message)


def match(mcd: MCD, ecp: ECP) -> MatchResult:
    """Apply the four SPEC rules and the two extensions; every failing rule is reported."""
    out: list[Rejection] = []
    if mcd.positional not in ecp.supports_positional:
        out.append(_reject(mcd, "positional", "positional", mcd.positional, _list(ecp.supports_positional)))
    if mcd.attention not in ecp.supports_attention:
        out.append(_reject(mcd, "attention", "attention", mcd.attention, _list(ecp.supports_attention)))
    supported_quant = _list(ecp.supports_quant)
    if not set(mcd.quant) & set(ecp.supports_quant):
        out.append(_reject(mcd, "quant", "quant", "one of " + _list(mcd.quant), supported_quant))
    if mcd.context_max > ecp.max_context:
        out.append(_reject(mcd, "context", "context_max", str(mcd.context_max), f"up to {ecp.max_context}"))
    lacking = [q for q in mcd.quant if q not in ecp.supports_quant]
    if lacking:
        required = f"all of {_list(mcd.quant)} (missing {_list(lacking)})"
        out.append(_reject(mcd, "quant_all", "quant", required, supported_quant))
    if mcd.architecture not in ecp.supports_architecture:
        out.append(_reject(mcd, "architecture", "architecture", mcd.architecture, _list(ecp.supports_architecture)))
    return MatchResult(tuple(out))


def require_match(mcd: MCD, ecp: ECP) -> MatchResult:
    """``match`` that raises CapabilityError (CAPABILITY_MISMATCH) naming every failed rule."""
    result = match(mcd, ecp)
    if not result.accepted:
        raise CapabilityError(result.message)
    return result
