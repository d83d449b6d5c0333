"""Synthetic GGUF models of real shapes, with valid random weight blocks (benchmarks, GPU tests).

The device machine reaches no model hub, so the benchmark writes models with
the exact tensor shapes of Qwen2.5 0.5B/1.5B/7B/72B (and tiny llama/qwen2/gemma3
shapes for tests) using our own ``GGUFWriter``. Weights are random but valid:
f16 scales are finite and small, so activations stay finite and every kernel
does real work. Tensor bytes are produced lazily from a small template ring,
so a 15 GB model is written at disk speed without sitting in RAM.

    python benchmarks/synth.py /tmp/q7.gguf --shape qwen2.5-7b --type F16
"""

from __future__ import annotations

import dataclasses

import argparse
import functools
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker_orcd.gguf import GGMLType, parse_file  # noqa: E402
from worker_orcd.gguf.constants import BLOCK_LAYOUT  # noqa: E402
from worker_orcd.gguf.writer import GGUFWriter, tensor_nbytes  # noqa: E402

ShapeName = Literal[
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-7b",
    "qwen2.5-72b",
    "tiny-qwen2",
    "tiny-llama",
    "tiny-gemma3",
    "mid-qwen2",
    "mid-llama",
    "mid-gemma3",
]
WeightType = Literal["F16", "Q8_0", "Q4_K_M", "Q3_K_M"]
MIXES = ("F16", "Q8_0", "Q4_K_M", "Q3_K_M")  # the named weight types; any other ggml type name puts every matrix in it


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: int
    context: int
    tied: bool
    head_dim: int | None = None  # None: d_model / n_heads
    rope_theta: float = 1e6
    sliding_window: int | None = None
    unique_weights: bool = False  # every tensor drawn fresh (no template ring): see _fresh
    output_norm_gain: float = 1.0  # final norm weight: > 1 spreads the logits like a trained model's


_MID: dict[str, Any] = {"unique_weights": True, "output_norm_gain": 4.0}

SHAPES: dict[str, Shape] = {
    # Qwen2.5 configs (config.json of Qwen/Qwen2.5-{0.5B,1.5B,7B}-Instruct)
    "qwen2.5-0.5b": Shape("qwen2", 24, 896, 14, 2, 4864, 151936, 32768, tied=True),
    "qwen2.5-1.5b": Shape("qwen2", 28, 1536, 12, 2, 8960, 151936, 32768, tied=True),
    "qwen2.5-7b": Shape("qwen2", 28, 3584, 28, 4, 18944, 152064, 32768, tied=False),
    # Qwen2.5-72B (issue 13's "72B class on one GPU"): a Q4_K_M file is ~47 GB (its FFN down rows,
    # 29,568 inputs, are not whole 256-blocks: Q8_0 there, as llama.cpp falls back)
    "qwen2.5-72b": Shape("qwen2", 80, 8192, 64, 8, 29568, 152064, 32768, tied=False),
    # tiny shapes: fast CPU tests of every architecture path
    "tiny-qwen2": Shape("qwen2", 2, 256, 4, 2, 512, 512, 256, tied=True),
    "tiny-llama": Shape("llama", 2, 256, 4, 2, 512, 512, 256, tied=False, rope_theta=10000.0),
    "tiny-gemma3": Shape("gemma3", 6, 256, 2, 1, 512, 512, 256, tied=True, head_dim=64, sliding_window=8),
    # mid shapes: a real model's layer geometry (head dim, GQA ratio, FFN width, window) with few
    # layers and a 32k vocab, so a GPU-vs-CPU comparison runs the real kernel shapes in seconds
    # (unique weights, spread logits: top-1 is decisive, so it can be compared across devices)
    "mid-qwen2": Shape("qwen2", 4, 896, 14, 2, 4864, 32768, 32768, tied=True, **_MID),  # Qwen2.5-0.5B
    "mid-llama": Shape(  # Llama-3.2-1B
        "llama", 2, 2048, 32, 8, 8192, 32000, 8192, tied=False, rope_theta=500000.0, **_MID
    ),
    "mid-gemma3": Shape(  # Gemma 3 270M: 5 local (512-token window) : 1 global layers
        "gemma3", 6, 640, 4, 1, 2048, 32768, 32768, tied=True, head_dim=256, sliding_window=512, **_MID
    ),
}

_TEMPLATE_BLOCKS = 1 << 16
_CHUNK = 16 << 20


def _random_blocks(rng: np.random.Generator, t: GGMLType, n: int) -> bytes:
    """``n`` valid random blocks of ``t`` (for F16: ``n`` runs of 32 values); magnitudes ~0.02 like
    trained weights."""
    if t is GGMLType.F16:
        return (rng.standard_normal(n * 32, dtype=np.float32) * 0.02).astype(np.float16).tobytes()
    if t is GGMLType.Q8_0:
        q8 = np.zeros(n, dtype=[("d", "<f2"), ("qs", "i1", 32)])
        q8["d"] = rng.uniform(0.5, 1.5, n) * (0.02 / 64)
        q8["qs"] = rng.integers(-128, 128, (n, 32))
        return q8.tobytes()
    if t is GGMLType.Q5_0:
        q5 = np.zeros(n, dtype=[("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])
        q5["d"] = rng.uniform(0.5, 1.5, n) * (0.02 / 16)
        q5["qh"] = rng.integers(0, 256, (n, 4))
        q5["qs"] = rng.integers(0, 256, (n, 16))
        return q5.tobytes()
    if t is GGMLType.Q4_K:
        q4k = np.zeros(n, dtype=[("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
        q4k["d"] = rng.uniform(0.5, 1.5, n) * 2e-5
        q4k["dmin"] = rng.uniform(0.5, 1.5, n) * 1e-5
        q4k["scales"] = rng.integers(0, 256, (n, 12))
        q4k["qs"] = rng.integers(0, 256, (n, 128))
        return q4k.tobytes()
    if t is GGMLType.Q6_K:
        q6k = np.zeros(n, dtype=[("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
        q6k["ql"] = rng.integers(0, 256, (n, 128))
        q6k["qh"] = rng.integers(0, 256, (n, 64))
        q6k["scales"] = rng.integers(-128, 128, (n, 16))
        q6k["d"] = rng.uniform(0.5, 1.5, n) * 5e-6
        return q6k.tobytes()
    return _random_blocks_more(rng, t, n)


def _random_blocks_more(rng: np.random.Generator, t: GGMLType, n: int) -> bytes:
    """The other types, for single-type models (kept apart so the mixes' files stay byte-identical)."""
    if t is GGMLType.F32:
        return (rng.standard_normal(n * 32, dtype=np.float32) * 0.02).astype("<f4").tobytes()
    if t is GGMLType.BF16:
        f32 = (rng.standard_normal(n * 32, dtype=np.float32) * 0.02).astype("<f4")
        return (f32.view("<u4") >> 16).astype("<u2").tobytes()
    if t is GGMLType.Q4_0:
        q4 = np.zeros(n, dtype=[("d", "<f2"), ("qs", "u1", 16)])
        q4["d"] = rng.uniform(0.5, 1.5, n) * (0.02 / 8)
        q4["qs"] = rng.integers(0, 256, (n, 16))
        return q4.tobytes()
    if t in (GGMLType.Q4_1, GGMLType.Q5_1):
        bits = 4 if t is GGMLType.Q4_1 else 5
        fields: list[Any] = [("d", "<f2"), ("m", "<f2")] + ([("qh", "u1", 4)] if bits == 5 else [])
        qx = np.zeros(n, dtype=[*fields, ("qs", "u1", 16)])
        qx["d"] = rng.uniform(0.5, 1.5, n) * (0.04 / (1 << bits))  # d * q + m spans about [-0.02, 0.02]
        qx["m"] = -rng.uniform(0.5, 1.5, n) * 0.02
        if bits == 5:
            qx["qh"] = rng.integers(0, 256, (n, 4))
        qx["qs"] = rng.integers(0, 256, (n, 16))
        return qx.tobytes()
    if t is GGMLType.Q5_K:
        q5k = np.zeros(
            n, dtype=[("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]
        )
        q5k["d"] = rng.uniform(0.5, 1.5, n) * 1e-5
        q5k["dmin"] = rng.uniform(0.5, 1.5, n) * 1e-5
        q5k["scales"] = rng.integers(0, 256, (n, 12))
        q5k["qh"] = rng.integers(0, 256, (n, 32))
        q5k["qs"] = rng.integers(0, 256, (n, 128))
        return q5k.tobytes()
    if t is GGMLType.Q2_K:  # x = (d * (sc & 15)) * q - dmin * (sc >> 4), q in 0..3
        q2k = np.zeros(n, dtype=[("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")])
        q2k["scales"] = rng.integers(0, 256, (n, 16))
        q2k["qs"] = rng.integers(0, 256, (n, 64))
        q2k["d"] = rng.uniform(0.5, 1.5, n) * (0.04 / 45)
        q2k["dmin"] = rng.uniform(0.5, 1.5, n) * (0.02 / 15)
        return q2k.tobytes()
    if t is GGMLType.Q3_K:  # x = (d * (s - 32)) * q, s in 0..63, q in -4..3
        q3k = np.zeros(n, dtype=[("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")])
        q3k["hmask"] = rng.integers(0, 256, (n, 32))
        q3k["qs"] = rng.integers(0, 256, (n, 64))
        q3k["scales"] = rng.integers(0, 256, (n, 12))
        q3k["d"] = rng.uniform(0.5, 1.5, n) * (0.02 / 64)
        return q3k.tobytes()
    raise ValueError(f"no random block generator for {t.name}")


_BLOCK_TYPES = (GGMLType.F16, GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K)


@functools.cache  # ~30 MB of random draws per seed: drawn once per process, not once per file
def _templates(seed: int) -> dict[GGMLType, bytes]:
    """One ring of valid random blocks per type (drawn in this fixed order: files stay reproducible)."""
    rng = np.random.default_rng(seed)
    return {t: _random_blocks(rng, t, _TEMPLATE_BLOCKS) for t in _BLOCK_TYPES}


def _fresh(t: GGMLType, n_bytes: int, seed: int, name: str) -> Callable[[], Iterable[bytes]]:
    """Random blocks drawn for this tensor alone: no row repeats another, so no two tokens share an
    embedding and logits have no exact ties (what a numerics comparison needs; costs RNG time)."""

    def gen() -> Iterable[bytes]:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        left = n_bytes
        while left:
            chunk = _random_blocks(rng, t, _TEMPLATE_BLOCKS)[:left]  # whole blocks: n_bytes is
            yield chunk  # a multiple of the block size
            left -= len(chunk)

    return gen


def _stream(template: bytes, n_bytes: int, block_bytes: int, name: str) -> Callable[[], Iterable[bytes]]:
    """Cycle through ``template`` from a name-dependent block, so tensors differ from each other."""
    n_blocks = len(template) // block_bytes
    start = (zlib.crc32(name.encode()) % n_blocks) * block_bytes

    def gen() -> Iterable[bytes]:
        # the template holds whole blocks and wraps exactly at its end, so the
        # concatenated stream is whole valid blocks whatever the chunk sizes
        view = memoryview(template)
        pos, left = start, n_bytes
        while left:
            n = min(left, _CHUNK, len(template) - pos)
            yield view[pos : pos + n]
            left -= n
            pos = (pos + n) % len(template)

    return gen


def _matrix_type(weight_type: WeightType | str, role: str, row: int) -> GGMLType:
    """llama.cpp-like mixes: Q4_K_M keeps output/attn_v/ffn_down at Q6_K; rows that are not a
    multiple of 256 fall back to 32-element blocks (as llama.cpp does for Qwen2.5-0.5B). Any other
    ggml type name: every matrix in that type, no fallback."""
    if weight_type not in MIXES:
        t = GGMLType[weight_type]
        if row % BLOCK_LAYOUT[t].block_size:
            raise ValueError(f"{role}: row length {row} is not whole {t.name} blocks; pick another shape")
        return t
    if weight_type == "F16":
        return GGMLType.F16
    if weight_type == "Q8_0":
        return GGMLType.Q8_0
    if weight_type == "Q3_K_M":  # Q3_K (no fused kernel) beside fused K-quants, also inside Q/K/V
        t = {"output": GGMLType.Q6_K, "attn_v": GGMLType.Q5_K, "ffn_down": GGMLType.Q4_K}.get(role, GGMLType.Q3_K)
        return t if row % 256 == 0 else GGMLType.Q8_0 if role == "output" else GGMLType.Q5_0
    t = GGMLType.Q6_K if role in ("output", "attn_v", "ffn_down") else GGMLType.Q4_K
    if row % 256:
        t = GGMLType.Q8_0 if t is GGMLType.Q6_K else GGMLType.Q5_0
    return t


def _f32(values: np.ndarray) -> bytes:
    return values.astype("<f4").tobytes()


def write_synthetic_model(
    path: str | Path,
    shape: ShapeName | Shape,
    weight_type: WeightType | str,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write a GGUF of ``shape`` with ``weight_type`` matrices (norms/biases F32); returns the path.

    ``weight_type``: a mix (``MIXES``) or any ggml type name with a block generator here.
    ``tokenizer_from``: a GGUF whose ``tokenizer.*`` metadata is copied in, so the
    daemon can serve the synthetic model (e.g. a real model's tokenizer).
    """
    if isinstance(shape, str) and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    if weight_type not in MIXES and weight_type not in GGMLType.__members__:
        raise ValueError(f"unknown weight type {weight_type!r} (known: {', '.join(MIXES)} or a ggml type name)")
    s = SHAPES[shape] if isinstance(shape, str) else shape
    hd = s.head_dim or s.d_model // s.n_heads
    q, kv, d, f, V = s.n_heads * hd, s.n_kv_heads * hd, s.d_model, s.ffn_dim, s.vocab
    tmpl = dict(_templates(seed))
    own = [GGMLType[weight_type]] if weight_type not in MIXES else []
    if weight_type == "Q3_K_M":
        own = [GGMLType.Q3_K, GGMLType.Q5_K]
    for t_own in own:  # its own stream: the other mixes' draws stay as they were
        if t_own not in tmpl:
            tmpl[t_own] = _random_blocks(np.random.default_rng([seed, t_own.value]), t_own, _TEMPLATE_BLOCKS)
    rng = np.random.default_rng(seed + 1)
    w = GGUFWriter()
    a = s.arch
    w.add("general.architecture", a)
    w.add("general.name", f"synthetic {shape if isinstance(shape, str) else s.arch} {weight_type}")
    w.add(f"{a}.block_count", s.n_layers)
    w.add(f"{a}.context_length", s.context)
    w.add(f"{a}.embedding_length", d)
    w.add(f"{a}.feed_forward_length", f)
    w.add(f"{a}.attention.head_count", s.n_heads)
    w.add(f"{a}.attention.head_count_kv", s.n_kv_heads)
    w.add(f"{a}.rope.freq_base", s.rope_theta)
    w.add(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add(f"{a}.vocab_size", V)
    if s.head_dim is not None:
        w.add(f"{a}.attention.key_length", hd)
        w.add(f"{a}.attention.value_length", hd)
    if s.sliding_window is not None:
        w.add(f"{a}.attention.sliding_window", s.sliding_window)
    if tokenizer_from is not None:
        donor = parse_file(tokenizer_from)
        for key, value in donor.metadata.items():
            if key.startswith("tokenizer."):
                w.add(key, value, donor.value_types[key], donor.array_types.get(key))

    def matrix(name: str, role: str, ggml_shape: tuple[int, int]) -> None:
        t = _matrix_type(weight_type, role, ggml_shape[0])
        nbytes = tensor_nbytes(ggml_shape, t)
        if s.unique_weights:
            w.add_tensor(name, ggml_shape, t, _fresh(t, nbytes, seed, name))
        else:
            w.add_tensor(name, ggml_shape, t, _stream(tmpl[t], nbytes, BLOCK_LAYOUT[t].type_size, name))

    def vector(name: str, values: np.ndarray) -> None:
        w.add_tensor(name, (values.size,), GGMLType.F32, _f32(values))

    norm = np.ones(d, dtype=np.float32)
    matrix("token_embd.weight", "token_embd", (d, V))
    if not s.tied:
        matrix("output.weight", "output", (d, V))
    vector("output_norm.weight", norm * np.float32(s.output_norm_gain))
    for i in range(s.n_layers):
        b = f"blk.{i}."
        vector(b + "attn_norm.weight", norm)
        matrix(b + "attn_q.weight", "attn_q", (d, q))
        matrix(b + "attn_k.weight", "attn_k", (d, kv))
        matrix(b + "attn_v.weight", "attn_v", (d, kv))
        if a == "qwen2":
            for part, n in (("q", q), ("k", kv), ("v", kv)):
                vector(b + f"attn_{part}.bias", rng.standard_normal(n).astype(np.float32) * 0.02)
        if a == "gemma3":
            vector(b + "attn_q_norm.weight", np.ones(hd, dtype=np.float32))
            vector(b + "attn_k_norm.weight", np.ones(hd, dtype=np.float32))
            vector(b + "post_attention_norm.weight", norm)
            vector(b + "post_ffw_norm.weight", norm)
        matrix(b + "attn_output.weight", "attn_output", (q, d))
        vector(b + "ffn_norm.weight", norm)
        matrix(b + "ffn_gate.weight", "ffn_gate", (d, f))
        matrix(b + "ffn_up.weight", "ffn_up", (d, f))
        matrix(b + "ffn_down.weight", "ffn_down", (f, d))
    return w.write(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--type", dest="weight_type", choices=list(MIXES), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, default=None, help="copy this GGUF's tokenizer in")
    ap.add_argument("--vocab", type=int, default=None, help="embedding rows (llama.cpp wants the tokenizer's count)")
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape] if args.vocab is None else dataclasses.replace(SHAPES[args.shape], vocab=args.vocab)
    out = write_synthetic_model(args.path, shape, args.weight_type, args.seed, tokenizer_from=args.tokenizer_from)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
