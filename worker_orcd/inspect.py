"""`worker-orcd inspect MODEL`: what an operator needs to know before serving a model file.

It runs the very pipeline the worker runs at load (``loader.validate_model``:
confinement, hash before parse, expected digest, signature, defensive parse,
MCD + sidecar), so a bad file fails here with the same message it would fail
with at startup, and then reports the file's facts and whether this engine's
ECP accepts it. Nothing touches a GPU.

Without ``--model-root`` the model's own (canonical) directory is the root:
the operator named the file explicitly, so confinement has nothing to protect,
and a root is still needed to resolve the reference the same way as ``serve``.
Give ``--model-root`` to check a reference exactly as a worker with that root
would resolve it (relative names, ``..``, symlinks leaving the root).
"""

from __future__ import annotations

import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .capability import match
from .engine.config import model_config
from .engine.profile import build_ecp
from .engine.vram_budget import vram_plan_summary
from .errors import ModelLoadError, WorkerError
from .gguf.constants import ValueType
from .gguf.reader import GGUFFile
from .loader import LoadOptions, ValidatedModel, validate_model
from .sources import DEFAULT_MODEL_ROOT

MAX_LISTED = 1024
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # as sources.resolve_model_source reads it
# (report key, metadata key after "{arch}."): fixed so --json keys are stable (null when absent).
HYPERPARAMETERS: tuple[tuple[str, str], ...] = (
    ("block_count", "block_count"),
    ("context_length", "context_length"),
    ("embedding_length", "embedding_length"),
    ("feed_forward_length", "feed_forward_length"),
    ("head_count", "attention.head_count"),
    ("head_count_kv", "attention.head_count_kv"),
    ("key_length", "attention.key_length"),
    ("value_length", "attention.value_length"),
    ("rope_dimension_count", "rope.dimension_count"),
    ("rope_freq_base", "rope.freq_base"),
    ("rope_scaling_type", "rope.scaling.type"),
    ("rope_scaling_factor", "rope.scaling.factor"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
    ("layer_norm_eps", "attention.layer_norm_epsilon"),
    ("sliding_window", "attention.sliding_window"),
    ("attn_logit_softcapping", "attn_logit_softcapping"),
    ("final_logit_softcapping", "final_logit_softcapping"),
    ("expert_count", "expert_count"),
    ("expert_used_count", "expert_used_count"),
)


def default_root_for(ref: str) -> tuple[str, Path]:
    """(reference to resolve, root) when no root is given: the model's own canonical directory.

    A plain path is made absolute here (against the operator's working directory,
    not a root); a ``file:`` URI is kept as written so its host check still applies.
    """
    scheme = _SCHEME.match(ref)
    if scheme and scheme.group(1).lower() == "file":
        raw = unquote(urlsplit(ref).path)
    elif scheme:  # shm: (confined to /dev/shm) or an unknown scheme the resolver will name
        return ref, DEFAULT_MODEL_ROOT
    else:
        raw = ref
    if not raw.strip() or "\0" in raw:
        return ref, Path.cwd()  # the resolver reports the bad reference in its own words
    real = Path(os.path.realpath(raw))
    return (ref if scheme else str(real)), real.parent


def _f32(value: float) -> float:
    """Shortest decimal that is the same float32: 1e-06, not 9.999999974752427e-07."""
    exact = struct.pack("<f", value)
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack("<f", short) == exact:
            return short
    return value


def _clean(gguf: GGUFFile, key: str) -> Any:
    value = gguf.metadata.get(key)
    if value is None:
        return None
    if isinstance(value, list) and len(value) > MAX_LISTED:  # per-layer lists are short; others are noise
        return f"<array of {len(value)}>"
    f32 = gguf.value_types.get(key) is ValueType.FLOAT32 or gguf.array_types.get(key) is ValueType.FLOAT32
    if f32 and isinstance(value, list):
        return [_f32(v) for v in value]
    return _f32(value) if f32 and isinstance(value, float) else value


def hyperparameters(gguf: GGUFFile) -> dict[str, Any]:
    arch = gguf.architecture
    out = {name: _clean(gguf, f"{arch}.{suffix}") for name, suffix in HYPERPARAMETERS}
    heads, embd = out["head_count"], out["embedding_length"]
    head_dim = out["key_length"]
    if head_dim is None and isinstance(heads, int) and isinstance(embd, int) and heads and embd % heads == 0:
        head_dim = embd // heads
    out["head_dim"] = head_dim
    return out


def tokenizer_facts(gguf: GGUFFile) -> dict[str, Any]:
    meta = gguf.metadata
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    return {
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens) if isinstance(tokens, list) else None,
        "merges": len(merges) if isinstance(merges, list) else None,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "chat_template": isinstance(meta.get("tokenizer.chat_template"), str),
    }


def tensor_histogram(gguf: GGUFFile) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for t in gguf.tensors:
        counts[t.type_name] += 1
        sizes[t.type_name] += t.n_bytes
    # dequantized_at_load: the engine has no fused matmul for the type, so its matrices are
    # dequantized at load in every residency (the other types stay blocks with --resident-weights quantized)
    at_load = set(build_ecp("inspect", 0).quant_dequantized_at_load)
    types = [
        {"type": name, "count": counts[name], "bytes": sizes[name], "dequantized_at_load": name in at_load}
        for name in sorted(counts)
    ]
    return {"count": len(gguf.tensors), "bytes": gguf.tensor_bytes, "types": types}


def vram_plan(gguf: GGUFFile, kv_cache_mb: int | None) -> dict[str, Any] | None:
    """The CUDA engine's resident bytes for this file (no GPU needed); null for a model it cannot run."""
    try:
        cfg = model_config(gguf)
    except WorkerError:
        return None
    return vram_plan_summary(cfg, gguf, kv_cache_mb)


def report(model: ValidatedModel, kv_cache_mb: int | None = None) -> dict[str, Any]:
    """The inspector's one JSON object (keys are stable; absent facts are null)."""
    gguf = model.gguf
    ecp = build_ecp("inspect", 0)
    engine = {k: v for k, v in ecp.to_dict().items() if k not in ("worker_id", "vram_bytes")}
    name = gguf.metadata.get("general.name")
    return {
        "model_ref": model.source.ref,
        "path": str(model.source.path),
        "source_kind": model.source.kind,
        "size": model.size,
        "sha256": model.digest,
        "signature": model.signature,
        "gguf_version": gguf.version,
        "metadata_keys": len(gguf.metadata),
        "architecture": gguf.architecture,
        "name": name if isinstance(name, str) else None,
        "file_type": gguf.metadata.get("general.file_type"),
        "hyperparameters": hyperparameters(gguf),
        "tokenizer": tokenizer_facts(gguf),
        "tensors": tensor_histogram(gguf),
        "mcd": model.mcd.to_dict(),
        "ecp": engine,
        "match": match(model.mcd, ecp).to_dict(),
        "vram_plan": vram_plan(gguf, kv_cache_mb),
    }


def inspect_model(
    ref: str,
    *,
    model_root: Path | None = None,
    expected_sha256: str | None = None,
    public_key_path: Path | None = None,
    kv_cache_mb: int | None = None,
) -> dict[str, Any]:
    """Validate like a load (same errors), then report. Raises WorkerError on a bad file."""
    if model_root is None:
        ref, model_root = default_root_for(ref)
        if not model_root.is_dir():  # else the resolver would blame a root the operator never gave
            raise ModelLoadError(f"model file {ref} not found ({model_root} does not exist)")
    options = LoadOptions(model_root=model_root, expected_sha256=expected_sha256, public_key_path=public_key_path)
    return report(validate_model(ref, options, ecp=None), kv_cache_mb)


# --- human output -------------------------------------------------------------------------


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        if value and all(v == value[0] for v in value):
            return f"{_value(value[0])} (all {len(value)} layers)"
        shown = ", ".join(_value(v) for v in value[:8])
        return f"[{shown}{', ...' if len(value) > 8 else ''}] (per layer)"
    return str(value)


def _safe(text: str) -> str:
    """Strings from the file reach the operator's terminal: escape control characters."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _section(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [title] + [f"  {k.ljust(width)}  {_safe(v)}" for k, v in rows]


def _mib(n: int) -> str:
    return f"{n:,} bytes ({n / (1 << 20):.1f} MiB)"


def render_text(rep: dict[str, Any]) -> str:
    """Aligned and readable: the JSON's facts except the engine profile itself."""
    hp = {k: v for k, v in rep["hyperparameters"].items() if v is not None}
    tok = rep["tokenizer"]
    mcd = rep["mcd"]
    out = _section(
        "model",
        [
            ("path", rep["path"] if rep["source_kind"] == "file" else f"{rep['path']} (shared memory)"),
            ("size", _mib(rep["size"])),
            ("sha256", rep["sha256"]),
            ("signature", rep["signature"]),
            ("gguf", f"v{rep['gguf_version']}, {rep['metadata_keys']} metadata keys"),
            ("architecture", rep["architecture"]),
            ("name", _value(rep["name"])),
            ("file_type", _value(rep["file_type"])),
        ],
    )
    out += _section("hyper-parameters", [(k, _value(v)) for k, v in hp.items()] or [("(none)", "")])
    out += _section("tokenizer", [(k, _value(v)) for k, v in tok.items()])
    tensors = rep["tensors"]
    types = tensors["types"]
    tw = max((len(t["type"]) for t in types), default=4)
    cw = max((len(str(t["count"])) for t in types), default=1)
    out.append(f"tensors: {tensors['count']}, {_mib(tensors['bytes'])}")
    out += [
        f"  {t['type'].ljust(tw)}  {str(t['count']).rjust(cw)} tensors  {_mib(t['bytes'])}"
        + ("  (no fused kernel: dequantized at load)" if t.get("dequantized_at_load") else "")
        for t in types
    ]
    out += _section("mcd", [(k, ", ".join(v) if isinstance(v, list) else _value(v)) for k, v in mcd.items()])
    verdict = rep["match"]
    if verdict["accepted"]:
        out.append("capability: accepted by this engine (MCD within ECP)")
    else:
        out.append("capability: REJECTED by this engine")
        out += [f"  - [{r['rule']}] {r['message']}" for r in verdict["rejections"]]
    return "\n".join(out)
