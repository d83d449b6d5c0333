"""One entry point per primitive: the Triton kernel on CUDA tensors, plain torch on the CPU.

The CPU branch is the development/test mode's implementation AND the readable
statement of what each kernel computes (float32 math, same masking and RoPE
conventions); the model code calls only these functions, so both modes run
the same forward pass.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import fused
from . import kernels as K
from .dequant import dequantize
from .qweight import QWeight, Weight, WeightGroup
from ..gguf.constants import GGMLType
from .reference import checksum_cpu, sample_reference
from .sample_rows import SampleRows, check_logits, check_rows

if TYPE_CHECKING:
    from .runner import AttentionMeta

_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
_kernels_on_cpu = False


def use_kernels_on_cpu(enabled: bool) -> None:
    """Tests: route CPU tensors through the Triton kernels (interpreter) to check the GPU code path."""
    global _kernels_on_cpu
    if enabled and not _TRITON_INTERPRETED:
        raise RuntimeError("running Triton kernels on CPU tensors needs TRITON_INTERPRET=1 before triton loads")
    _kernels_on_cpu = enabled


def _kernel(t: torch.Tensor) -> bool:
    """True: this call takes the Triton path (every CUDA tensor; CPU tensors only when forced)."""
    return t.device.type == "cuda" or _kernels_on_cpu


# --- normalisation ----------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32."""
    if _kernel(x):
        return K.rms_norm(x, weight, eps, out=out)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    if out is None:
        return y
    return out.copy_(y)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused with the next norm."""
    if _kernel(x):
        return K.add_rms_norm(x, residual, weight, eps)
    s = x + residual
    return rms_norm(s, weight, eps), s


# --- rotary position embedding ----------------------------------------------------------------


def rope_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float, neox: bool, rotary_dim: int | None = None,
    freq: torch.Tensor | None = None,
) -> None:
    """Rotate q[T,Hq,D] and k[T,Hk,D] in place by their positions (llama pairs or neox halves).
    ``freq``: the model's table for ``theta`` (``rope_table``); the kernel path builds one otherwise."""
    if _kernel(q):
        K.rope_(q, k, positions, theta, neox, rotary_dim, freq=freq)
        return
    D = q.shape[-1]
    rd = D if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, rd/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    for x in (q, k):
        xf = x[..., :rd].float()
        if neox:
            a, b = xf[..., : rd // 2], xf[..., rd // 2 :]
            rot = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        else:
            a, b = xf[..., 0::2], xf[..., 1::2]
            rot = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        x[..., :rd] = rot.to(x.dtype)


def rope_store_(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slots: torch.Tensor, positions: torch.Tensor, theta: float, neox: bool, rotary_dim: int | None = None,
    freq: torch.Tensor | None = None,
) -> None:
    """``rope_(q, k, ...)`` then ``kv_store_(k_cache, v_cache, k, v, slots)``; on the kernel path one launch
    (bit for bit the two) where whole heads rotate, the two launches otherwise."""
    if _kernel(q) and (rotary_dim is None or rotary_dim == q.shape[-1]):
        K.rope_store_(q, k, v, k_cache, v_cache, slots, positions, theta, neox, freq=freq)
        return
    rope_(q, k, positions, theta, neox, rotary_dim, freq)
    kv_store_(k_cache, v_cache, k, v, slots)


# --- attention --------------------------------------------------------------------------------


def _attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int | None, q_offset: int
) -> torch.Tensor:
    T, Hq, D = q.shape
    S, Hk, _ = k.shape
    G = Hq // Hk
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc).view(T, Hk, G, D).permute(1, 2, 0, 3)  # [Hk, G, T, D]
    kf = k.to(acc).permute(1, 0, 2)  # [Hk, S, D]
    vf = v.to(acc).permute(1, 0, 2)
    scores = torch.matmul(qf, kf[:, None].transpose(-1, -2)) * scale  # [Hk, G, T, S]
    qpos = torch.arange(T)[:, None] + q_offset
    kpos = torch.arange(S)[None, :]
    visible = kpos <= qpos
    if sliding_window is not None:
        visible &= qpos - kpos < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vf[:, None])  # [Hk, G, T, D]
    return out.permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)


def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Causal GQA attention of T queries at positions q_offset.. over keys 0..S-1 -> [T,Hq,D].

    Key j is visible to the query at absolute position i iff j <= i and, with a
    window W, i - j < W (Gemma 3 / llama.cpp / transformers convention).
    """
    if _kernel(q):
        return K.attention_prefill(q, k, v, scale, sliding_window=sliding_window, q_offset=q_offset)
    return _attention_reference(q, k, v, scale, sliding_window, q_offset)


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query (the newest token, at position seq_len-1) over the first seq_len cached keys -> [Hq,D]."""
    if _kernel(q):
        return K.attention_decode(q, k_cache, v_cache, seq_len, scale, sliding_window=sliding_window, out=out)
    n = int(seq_len.reshape(-1)[0])
    y = _attention_reference(q[None], k_cache[:n], v_cache[:n], scale, sliding_window, n - 1)[0]
    if out is None:
        return y
    return out.copy_(y)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: "AttentionMeta",
    scale: float,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention of a step's rows over the paged cache -> [T, Hq, D] (see kernels/attention_paged.py).

    The CPU branch runs each row on its own, in float64, rounded once at the end: a row's
    result then does not depend on the batch (up to float64 rounding order, far below fp32's).
    """
    if _kernel(q):
        return K.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.tile_row, meta.tile_q0, meta.row_qstart,
            meta.row_qlen, meta.row_start, scale, sliding_window=sliding_window, split=meta.split,
        )
    out = torch.empty_like(q)
    BS = k_cache.shape[1]
    for r, (qs, ql, st) in enumerate(meta.host_rows):
        n = st + ql
        pages = meta.host_tables[r][: -(-n // BS)]
        k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n]
        v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n]
        y = _attention_reference(q[qs : qs + ql].double(), k.double(), v.double(), scale, sliding_window, st)
        out[qs : qs + ql] = y.to(q.dtype)
    return out


def kv_store_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write each token's K/V [T, Hk, D] to its cache slot (block * block_size + offset); graph safe."""
    if _kernel(k_cache):
        fused.kv_store_(k_cache, v_cache, k, v, slots)
        return
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slots, k)
    flat_v.index_copy_(0, slots, v)


# --- KV cache write and feed-forward activation ------------------------------------------------


def kv_write_(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
) -> None:
    """k_cache[pos] = k; v_cache[pos] = v with ``pos`` a device tensor [1] (no host sync; graph safe)."""
    if _kernel(k_cache):
        fused.kv_write_(k_cache, v_cache, k, v, pos)
        return
    fused.check_kv_write(k_cache, v_cache, k, v, pos)
    k_cache.index_copy_(0, pos.reshape(1), k[None])
    v_cache.index_copy_(0, pos.reshape(1), v[None])


def gated_act(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for the fused [T, 2f] projection (SiLU for llama/qwen2, GELU-tanh for Gemma)."""
    if _kernel(gate_up):
        return fused.gated_act(gate_up, activation)
    f = fused.check_gated_act(gate_up, activation)
    gate, up = gate_up[:, :f], gate_up[:, f:]
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


# CPU dev mode: rows are multiplied in fixed-shape blocks of CPU_ROW_BLOCK (the last one zero-padded),
# one BLAS call per block. MKL picks its kernels, threading and K blocking from the shape, so the
# same [16, K] x [K, N] call computes a row identically whatever the batch size M is and wherever
# the row sits; a single [M, K] call does not (measured: 28 of 77 row sets differ bitwise).
CPU_ROW_BLOCK = 16


def mm_rows_invariant(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x[M, K] @ w[N, K].T on the CPU with each row's result independent of M and of its position."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    B = CPU_ROW_BLOCK
    Mp = -(-M // B) * B
    if Mp != M:
        x2 = torch.cat((x2, x2.new_zeros(Mp - M, K)))
    else:
        x2 = x2.contiguous()
    y = x2.new_empty(Mp, w.shape[0])
    wt = w.t()
    for i in range(0, Mp, B):
        torch.mm(x2[i : i + B], wt, out=y[i : i + B])
    return y[:M].reshape(*lead, w.shape[0])


def _as_qweight(w: Weight) -> QWeight | WeightGroup:
    """A dense [N, K] float matrix is a QWeight of its float type: the same invariant kernel."""
    if isinstance(w, (QWeight, WeightGroup)):
        return w
    t = {torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16, torch.float32: GGMLType.F32}[w.dtype]
    return QWeight(w.contiguous().view(-1).view(torch.uint8), t, w.shape[0], w.shape[1])


def _qkernel(x: torch.Tensor) -> bool:
    """The Triton matmul path; not for bf16 on CPU tensors (the interpreter's tl.dot multiplies
    bf16 as raw integer bits), which take the torch path."""
    return x.device.type == "cuda" or (_kernels_on_cpu and x.dtype != torch.bfloat16)


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None, locks: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias); a row's result never depends on the batch size or its position in it.

    CUDA: batch-invariant Triton kernels, never cuBLAS (it picks its algorithm by M): dense
    weights through ``kernels/matmul_dense`` (``locks``: the model's zeroed split-K counters),
    quantized ones through the fused dequant-matmul ``kernels/qmatmul``. CPU: ``mm_rows_invariant``."""
    if _qkernel(x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if _dense_kernel(x2, w):
            y = K.dense_matmul(x2, w, bias, locks=locks)  # type: ignore[arg-type]
        else:
            y = K.qlinear(x2, _as_qweight(w), bias)
        return y.reshape(*lead, y.shape[-1])
    if not isinstance(w, torch.Tensor):
        w = w.dequantize(torch.float32).to(x.dtype)  # a quantized weight on the CPU: tests only
    y = mm_rows_invariant(x, w)
    return y if bias is None else y + bias


def logits_fp32(h: torch.Tensor, w: Weight, locks: torch.Tensor | None = None) -> torch.Tensor:
    """Final projection with fp32 output: fp16 logits would round away near-ties (0.015 at 30)."""
    if _qkernel(h):
        if _dense_kernel(h, w):
            return K.dense_matmul(h, w, out_dtype=torch.float32, locks=locks)  # type: ignore[arg-type]
        return K.qlinear(h, _as_qweight(w), out_dtype=torch.float32)
    if not isinstance(w, torch.Tensor):
        w = w.dequantize(torch.float32).to(h.dtype)
    return mm_rows_invariant(h, w).float()


def _dense_kernel(x: torch.Tensor, w: Weight) -> bool:
    return isinstance(w, torch.Tensor) and w.dtype == x.dtype and w.is_contiguous() and x.stride(-1) == 1


def rope_table(theta: float, rotary_dim: int, device: torch.device) -> torch.Tensor | None:
    """The RoPE kernel's frequency table for one theta (owned by the model); None on the torch path."""
    if device.type != "cuda" and not _kernels_on_cpu:
        return None
    from .kernels.rope import freq_table

    return freq_table(theta, rotary_dim, device)


def matmul_locks(weights: Sequence[Weight], device: torch.device) -> torch.Tensor | None:
    """The zeroed split-K counters the dense matmuls of one model share (they run one after another
    on one stream and each launch leaves them zeroed); ``None`` where no kernel uses them."""
    if device.type != "cuda" and not _kernels_on_cpu:
        return None
    from .kernels.matmul_dense import lock_slots

    n = max((lock_slots(w.shape[0]) for w in weights if isinstance(w, torch.Tensor)), default=1)
    return torch.zeros(n, dtype=torch.int32, device=device)


def embedding(tokens: torch.Tensor, w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``tokens`` of the embedding matrix in ``dtype``; a quantized one dequantizes only those rows."""
    if isinstance(w, torch.Tensor):
        return F.embedding(tokens, w)
    if isinstance(w, WeightGroup):
        raise TypeError("an embedding matrix is one tensor, not a group")
    rows = w.rows(tokens)
    n = tokens.numel() * w.k
    return dequantize(rows, w.ggml_type, n, dtype, force_triton=_kernels_on_cpu).view(*tokens.shape, w.k)


# --- sampling and fingerprint -----------------------------------------------------------------


def sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    penalty_ids: torch.Tensor | None,
    seed: int,
    step: int,
) -> torch.Tensor:
    """Next token id as a tensor [1] int64 on logits' device (greedy when temperature == 0)."""
    kwargs = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        penalty_ids=penalty_ids,
        seed=seed,
        step=step,
    )
    if _kernel(logits):
        return K.sample(logits, **kwargs)  # type: ignore[arg-type]
    return sample_reference(logits, **kwargs)  # type: ignore[arg-type]


def mask_from_bitmask(words: object, vocab: int, device: torch.device) -> torch.Tensor:
    """Packed int32 bitmask (bit t%32 of word t//32) -> bool [vocab]; ids past the mask are disallowed."""
    w = np.asarray(words, dtype=np.int32).reshape(-1).view(np.uint32)
    bits = ((w[:, None] >> np.arange(32, dtype=np.uint32)[None, :]) & 1).astype(bool).reshape(-1)
    out = np.zeros(vocab, dtype=bool)
    n = min(vocab, bits.size)
    out[:n] = bits[:n]
    return torch.from_numpy(out).to(device)


def sample_each(logits: torch.Tensor, rows: SampleRows) -> torch.Tensor:
    """The per-row path: for each row of ``logits`` [R, V], the presence/frequency penalty and the
    grammar mask in torch, then ``sample`` alone; int64 [R] on logits' device.

    The CPU mode's batched sampler, and the definition ``kernels.sample_batch`` is held to bit for bit.
    """
    n_rows, vocab = check_logits(logits)
    check_rows(rows, n_rows, vocab)
    device = logits.device
    pen_off = rows.penalty_offsets.tolist()
    gen_off = rows.generated_offsets.tolist()
    masked = rows.has_mask.tolist() if rows.has_mask is not None else [False] * n_rows
    picked: list[torch.Tensor] = []
    for r in range(n_rows):
        p = rows.row(r)
        raw = logits[r]
        generated = rows.generated_ids[gen_off[r] : gen_off[r + 1]]
        history = rows.penalty_ids[pen_off[r] : pen_off[r + 1]]
        presence, frequency = p.pop("presence_penalty"), p.pop("frequency_penalty")
        if p["temperature"] == 0.0 and p["repetition_penalty"] == 1.0 and not presence and not frequency and not masked[r]:
            picked.append(torch.argmax(raw).reshape(1))  # ties: the lowest id, as the kernel's greedy path
            continue
        row = raw
        if (presence or frequency) and generated.numel():
            gen = generated.to(device=device, dtype=torch.int64)
            counts = torch.bincount(gen, minlength=vocab)[:vocab].to(torch.float32)
            row = row - frequency * counts - presence * (counts > 0).to(torch.float32)
        if masked[r]:
            assert rows.allowed is not None
            row = row.masked_fill(~mask_from_bitmask(rows.allowed[r].numpy(), vocab, device), -math.inf)
        penalty = None
        if p["repetition_penalty"] != 1.0 and history.numel():
            penalty = history.to(device=device, dtype=torch.int64)
        picked.append(sample(row.contiguous(), penalty_ids=penalty, **p).reshape(1))  # type: ignore[arg-type]
    return torch.cat(picked)


def sample_batch(logits: torch.Tensor, rows: SampleRows) -> torch.Tensor:
    """Each row's next token, int64 [R] on logits' device: the batched kernels (a fixed number of
    launches for any R) on CUDA, ``sample_each`` (the same tokens) on the CPU."""
    if _kernel(logits):
        return K.sample_batch(logits, rows)
    return sample_each(logits, rows)


def checksum_hex(buffers: Sequence[torch.Tensor]) -> str:
    """Fingerprint of the resident bytes, computed where they live: the GPU kernel on CUDA, the
    same function (kernels/checksum.py's definition) on the CPU, in bounded chunks.

    One-off: the CUDA tile plan lives for this call only (``kernels.checksum()`` would keep it
    in a process-wide cache, SPEC 4013); a repeated check over fixed buffers uses ``Fingerprint``."""
    return Fingerprint(buffers).hex()


class Fingerprint:
    """A fingerprint bound to fixed buffers: on CUDA the tile plan is built once and owned here
    (freed with the model), so each seal check is just the kernel launches. Every digest runs on
    one side stream the object owns: a check computed beside the engine's steps (``start``) and a
    synchronous one (``hex``) never share the plan's scratch out of order."""

    def __init__(self, buffers: Sequence[torch.Tensor]) -> None:
        self.buffers = list(buffers)
        cuda = self.buffers[0].device.type == "cuda"
        self.plan = K.ChecksumPlan(self.buffers) if cuda else None
        self.stream = torch.cuda.Stream(self.buffers[0].device) if cuda else None

    def hex(self) -> str:
        if self.plan is not None:
            return self.start()()
        return f"{checksum_cpu(self.buffers):016x}"

    def start(self, programs: int | None = None) -> PendingFingerprint:
        """Start the fingerprint behind the work already queued on the current stream (a write to
        the weights queued before it is seen) and return it without waiting: on CUDA it runs on
        the side stream, beside whatever the current stream runs next (the engine's next step),
        in at most ``programs`` programs (``ChecksumPlan.digest``; the same value)."""
        if self.plan is None or self.stream is None:
            return PendingFingerprint(f"{checksum_cpu(self.buffers):016x}")
        host = torch.empty(1, dtype=torch.int64, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            host.copy_(self.plan.digest(programs), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return PendingFingerprint(None, host, done)


class PendingFingerprint:
    """A fingerprint started on the device: ``ready()`` asks without waiting, calling it waits and
    gives the 16 hex digits (a CPU fingerprint is ready at once)."""

    def __init__(self, value: str | None, host: torch.Tensor | None = None, done: torch.cuda.Event | None = None) -> None:
        self._value, self._host, self._done = value, host, done

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def __call__(self) -> str:
        if self._value is None:
            assert self._host is not None and self._done is not None
            self._done.synchronize()
            self._value = K.digest_hex(self._host)
        return self._value
