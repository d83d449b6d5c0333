"""The decoder-only forward pass for llama, qwen2 and gemma3, written out plainly (gpt-fast style).

Per layer: RMSNorm -> fused QKV GEMM (+bias) -> [Gemma: per-head q/k RMSNorm]
-> RoPE and K/V into the cache (one launch) -> attention -> output GEMM -> [Gemma: post-attn
norm] -> residual; RMSNorm -> fused gate/up GEMM -> SiLU | GELU-tanh * up ->
down GEMM -> [Gemma: post-FFN norm] -> residual. Each residual add is fused
with the norm that follows it. Only the last position's logits are computed,
in fp32. All primitives go through ``ops`` (Triton on CUDA, torch on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import ops
from .config import ModelConfig
from .weights import LayerWeights, ModelWeights

if TYPE_CHECKING:
    from .paged_kv import PagedKVCache
    from .runner import AttentionMeta

# (layer, q[T,Hq,D], k[T,Hk,D], v[T,Hk,D]) -> attention output [T,Hq,D]: rotates q/k by the step's
# positions (RoPE) and stores k/v in the cache (one launch: ops.rope_store_), then attends
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Model:
    """The forward pass over resident weights; the KV cache is the runner's, passed per step."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights) -> None:
        self.cfg = cfg
        self.w = weights
        mats = [weights.lm_head] + [m for lw in weights.layers for m in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
        # split-K counters of the dense matmuls (kernels/matmul_dense): this model's, zeroed between launches
        self.locks = ops.matmul_locks(mats, weights.arena.device)
        # RoPE frequency tables per theta (global and sliding-window layers), built before any graph capture
        rd = cfg.rotary_dim or cfg.head_dim
        self.rope_freq = {
            t: ops.rope_table(t, rd, weights.arena.device) for t in {cfg.layer_rope_theta(i) for i in range(cfg.n_layers)}
        }

    # --- building blocks --------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = ops.embedding(tokens, self.w.embed, self.w.dtype)
        if self.cfg.embed_scale is not None:
            x = x * self.cfg.embed_scale
        return x

    def _attention(self, i: int, lw: LayerWeights, h: torch.Tensor, attend: Attend) -> torch.Tensor:
        c = self.cfg
        T = h.shape[0]
        qkv = ops.linear(h, lw.wqkv, lw.bqkv, self.locks)
        q = qkv[:, : c.q_dim].reshape(T, c.n_heads, c.head_dim)
        k = qkv[:, c.q_dim : c.q_dim + c.kv_dim].reshape(T, c.n_kv_heads, c.head_dim)
        v = qkv[:, c.q_dim + c.kv_dim :].reshape(T, c.n_kv_heads, c.head_dim)
        if lw.q_norm is not None and lw.k_norm is not None:
            # the norm kernels take rows of unit stride: un-interleave q/k from the fused output
            q = ops.rms_norm(q.contiguous(), lw.q_norm, c.rms_eps)
            k = ops.rms_norm(k.contiguous(), lw.k_norm, c.rms_eps)
        out = attend(i, q, k, v)
        return ops.linear(out.reshape(T, c.q_dim), lw.wo, locks=self.locks)

    def _mlp(self, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        gate_up = ops.linear(h, lw.w_gate_up, locks=self.locks)
        return ops.linear(ops.gated_act(gate_up, self.cfg.activation), lw.w_down, locks=self.locks)

    def hidden(self, tokens: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Final-normed hidden states [T, d] of ``tokens`` (``attend`` knows their positions)."""
        c, w = self.cfg, self.w
        x = self.embed(tokens)
        h = ops.rms_norm(x, w.layers[0].attn_norm, c.rms_eps)
        for i, lw in enumerate(w.layers):
            o = self._attention(i, lw, h, attend)
            if lw.post_attn_norm is not None:
                o = ops.rms_norm(o, lw.post_attn_norm, c.rms_eps)
            h, x = ops.add_rms_norm(o, x, lw.ffn_norm, c.rms_eps)
            o = self._mlp(lw, h)
            if lw.post_ffn_norm is not None:
                o = ops.rms_norm(o, lw.post_ffn_norm, c.rms_eps)
            next_norm = w.layers[i + 1].attn_norm if i + 1 < c.n_layers else w.norm
            h, x = ops.add_rms_norm(o, x, next_norm, c.rms_eps)
        return h

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """fp32 logits [V] of one final-normed hidden state [1, d]."""
        return ops.logits_fp32(h_last, self.w.lm_head, self.locks)[0]

    # --- one batching-engine step: rows of tokens over the paged KV cache --------------------

    def forward_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        meta: AttentionMeta,
        sample_index: torch.Tensor,
        kv: PagedKVCache,
    ) -> torch.Tensor:
        """fp32 logits [R, V] of the tokens at ``sample_index`` after running every row's tokens.

        ``tokens``/``positions``/``slots`` [T] hold the step's rows back to back; each token's
        K/V goes to its cache slot before attention reads the row's keys through its block table.
        Device tensors only: a decode batch replays from a CUDA graph.
        """

        c = self.cfg

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = kv.k[i], kv.v[i]
            theta = c.layer_rope_theta(i)
            ops.rope_store_(q, k, v, kc, vc, slots, positions, theta, c.rope_neox, c.rotary_dim, self.rope_freq.get(theta))
            return ops.paged_attention(q, kc, vc, meta, c.attn_scale, sliding_window=c.layer_window(i))

        h = self.hidden(tokens, attend)
        return ops.logits_fp32(h.index_select(0, sample_index), self.w.lm_head, self.locks)
