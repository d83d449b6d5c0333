"""Model hyper-parameters read from GGUF metadata (llama, qwen2, gemma3).

Everything the forward pass needs is decided here, once, from the header, so
``model.py`` has no architecture strings in its hot path. Values the GGUF
file does not carry (Gemma 3's local RoPE base and layer pattern) are
constants with their source cited next to them. Pure Python: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import ModelLoadError
from ..gguf import GGUFFile

# general.architecture -> the RoPE variant its forward pass applies (the MCD's positional names).
# llama.cpp's converter permutes llama Q/K rows for adjacent-pair rotation; qwen2 and gemma3 keep
# the HF layout and rotate halves (LLAMA_ROPE_TYPE_NEOX).
ROPE_BY_ARCH = {"llama": "rope_llama", "qwen2": "rope_neox", "gemma3": "rope_neox"}
SUPPORTED_ARCHS = tuple(ROPE_BY_ARCH)
# Longest context a model may declare: the KV cache never holds more, and the ECP says so.
MAX_CONTEXT = 131072
AttentionKind = Literal["mha", "gqa", "mqa"]  # what ``attention_kind`` can return: any Hq % Hk == 0
ATTENTION_KINDS: tuple[str, ...] = get_args(AttentionKind)

# Gemma 3 constants that llama.cpp hard-codes instead of writing them to the file
# (llama.cpp src/llama-model.cpp, LLM_ARCH_GEMMA3: `hparams.set_swa_pattern(6)` and
# `hparams.rope_freq_base_train_swa = 10000.0f`), and that transformers'
# Gemma3TextConfig defaults to (`sliding_window_pattern=6`,
# `default_theta = {"global": 1e6, "local": 1e4}`; layer i is local unless (i+1) % 6 == 0).
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10_000.0
GEMMA3_DEFAULT_SLIDING_WINDOW = 512  # the 270M/1B/4B/12B/27B configs; the file's value wins
# Gemma 3 27B scales queries by (d_model / n_heads)^-0.5 = 168^-0.5 instead of head_dim^-0.5
# (transformers' 27B config: query_pre_attn_scalar=168; llama.cpp keys it on n_layer == 62).
GEMMA3_27B_LAYERS = 62

Activation = Literal["silu", "gelu_tanh"]


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float  # global layers
    rope_theta_local: float  # sliding-window layers (== rope_theta where there are none)
    rope_neox: bool  # True: rotate halves (neox/HF); False: rotate adjacent pairs (llama.cpp "normal")
    rotary_dim: int
    sliding_window: int | None  # keys visible to a query on a local layer: i - window < j <= i
    local_layers: tuple[bool, ...]  # per layer: True = sliding-window attention
    tied_embeddings: bool  # no output.weight: the lm head is token_embd
    qkv_bias: bool
    embed_scale: float | None  # Gemma multiplies embeddings by sqrt(d_model)
    activation: Activation
    qk_norm: bool  # Gemma 3: RMSNorm over each q/k head before RoPE
    post_norms: bool  # Gemma 3: RMSNorm on the attention and FFN outputs before the residual add
    attn_scale: float

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    def layer_rope_theta(self, layer: int) -> float:
        return self.rope_theta_local if self.local_layers[layer] else self.rope_theta

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.local_layers[layer] else None

    @property
    def attention_kind(self) -> AttentionKind:
        if self.n_kv_heads == self.n_heads:
            return "mha"
        return "mqa" if self.n_kv_heads == 1 else "gqa"


def _require_int(g: GGUFFile, key: str, default: int | None = None) -> int:
    value = g.arch_value(key, default)
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv) must be uniform here
        if not value or any(v != value[0] for v in value):
            raise ModelLoadError(
                f"{g.architecture}.{key} varies per layer ({value[:8]}…); only uniform layers are supported"
            )
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"GGUF metadata {g.architecture}.{key} must be a positive integer, got {value!r}")
    return value


def _require_float(g: GGUFFile, key: str, default: float | None = None) -> float:
    value = g.arch_value(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelLoadError(f"GGUF metadata {g.architecture}.{key} must be a positive number, got {value!r}")
    return float(value)


def _refuse_rope_scaling(g: GGUFFile) -> None:
    scaling: Any = g.arch_value("rope.scaling.type")
    factor: Any = g.arch_value("rope.scaling.factor")
    if (scaling not in (None, "none")) or (isinstance(factor, (int, float)) and factor not in (0, 1)):
        raise ModelLoadError(f"RoPE scaling {scaling!r} (factor {factor!r}) is not supported by this engine")
    if g.has_tensor("rope_freqs.weight"):
        raise ModelLoadError(
            "per-dimension RoPE frequency factors (rope_freqs.weight, Llama 3.1 style) are not supported"
        )


def model_config(g: GGUFFile) -> ModelConfig:
    """Read and sanity-check the hyper-parameters; refuse what the forward pass does not implement."""
    arch = g.architecture
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    if g.arch_value("expert_count", 0):
        raise ModelLoadError(f"mixture-of-experts {arch} models are not supported")
    _refuse_rope_scaling(g)

    n_layers = _require_int(g, "block_count")
    d_model = _require_int(g, "embedding_length")
    n_heads = _require_int(g, "attention.head_count")
    n_kv_heads = _require_int(g, "attention.head_count_kv", n_heads)
    if d_model % n_heads and g.arch_value("attention.key_length") is None:
        raise ModelLoadError(
            f"embedding_length {d_model} is not a multiple of head_count {n_heads} and key_length is absent"
        )
    head_dim = _require_int(g, "attention.key_length", d_model // n_heads)
    value_dim = _require_int(g, "attention.value_length", head_dim)
    if value_dim != head_dim:
        raise ModelLoadError(f"key_length {head_dim} != value_length {value_dim} is not supported")
    if n_heads % n_kv_heads:
        raise ModelLoadError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
    if head_dim % 2:
        raise ModelLoadError(f"head dimension {head_dim} is odd; RoPE needs pairs")
    ffn_dim = _require_int(g, "feed_forward_length")
    context = _require_int(g, "context_length")
    if context > MAX_CONTEXT:
        raise ModelLoadError(f"context_length {context} exceeds this engine's max_context {MAX_CONTEXT}")
    eps = _require_float(g, "attention.layer_norm_rms_epsilon", 1e-5)
    rope_theta = _require_float(g, "rope.freq_base", 10_000.0)
    rotary_dim = _require_int(g, "rope.dimension_count", head_dim)
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ModelLoadError(f"rope.dimension_count {rotary_dim} must be even and <= head dimension {head_dim}")

    if not g.has_tensor("token_embd.weight"):
        raise ModelLoadError("tensor token_embd.weight is missing")
    embd = g.tensor("token_embd.weight")
    if len(embd.shape) != 2 or embd.shape[0] != d_model:
        raise ModelLoadError(f"token_embd.weight has shape {list(embd.shape)}, expected [{d_model}, vocab]")
    vocab = embd.shape[1]

    is_gemma = arch == "gemma3"
    local_layers = tuple(False for _ in range(n_layers))
    window: int | None = None
    rope_local = rope_theta
    if is_gemma:
        window = _require_int(g, "attention.sliding_window", GEMMA3_DEFAULT_SLIDING_WINDOW)
        pattern = _require_int(g, "attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
        local_layers = tuple((i + 1) % pattern != 0 for i in range(n_layers))
        rope_local = GEMMA3_LOCAL_ROPE_BASE
        scale_dim = d_model // n_heads if n_layers == GEMMA3_27B_LAYERS else head_dim
    else:
        scale_dim = head_dim

    return ModelConfig(
        arch=arch,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=ffn_dim,
        vocab_size=vocab,
        context_length=context,
        rms_eps=eps,
        rope_theta=rope_theta,
        rope_theta_local=rope_local,
        rope_neox=ROPE_BY_ARCH[arch] == "rope_neox",
        rotary_dim=rotary_dim,
        sliding_window=window,
        local_layers=local_layers,
        tied_embeddings=not g.has_tensor("output.weight"),
        qkv_bias=g.has_tensor("blk.0.attn_q.bias"),
        embed_scale=math.sqrt(d_model) if is_gemma else None,
        activation="gelu_tanh" if is_gemma else "silu",
        qk_norm=is_gemma,
        post_norms=is_gemma,
        attn_scale=scale_dim**-0.5,
    )
