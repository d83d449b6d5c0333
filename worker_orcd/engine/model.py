"""The decoder-only forward pass for llama, qwen2 and gemma3, written out plainly (gpt-fast style).

Per layer: RMSNorm -> fused QKV GEMM (+bias) -> [Gemma: per-head q/k RMSNorm]
-> RoPE -> K/V into the cache -> attention -> output GEMM -> [Gemma: post-attn
norm] -> residual; RMSNorm -> fused gate/up GEMM -> SiLU | GELU-tanh * up ->
down GEMM -> [Gemma: post-FFN norm] -> residual. Each residual add is fused
with the norm that follows it. Only the last position's logits are computed,
in fp32. All primitives go through ``ops`` (Triton on CUDA, torch on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import ops
from .config import ModelConfig
from .kv_cache import KVCache
from .weights import LayerWeights, ModelWeights

# (layer, q[T,Hq,D], k[T,Hk,D], v[T,Hk,D]) -> attention output [T,Hq,D]; also stores k/v in the cache
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Model:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, kv: KVCache) -> None:
        self.cfg = cfg
        self.w = weights
        self.kv = kv

    # --- building blocks --------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = ops.embedding(tokens, self.w.embed, self.w.dtype)
        if self.cfg.embed_scale is not None:
            x = x * self.cfg.embed_scale
        return x

    def _attention(
        self, i: int, lw: LayerWeights, h: torch.Tensor, positions: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        c = self.cfg
        T = h.shape[0]
        qkv = ops.linear(h, lw.wqkv, lw.bqkv)
        q = qkv[:, : c.q_dim].reshape(T, c.n_heads, c.head_dim)
        k = qkv[:, c.q_dim : c.q_dim + c.kv_dim].reshape(T, c.n_kv_heads, c.head_dim)
        v = qkv[:, c.q_dim + c.kv_dim :].reshape(T, c.n_kv_heads, c.head_dim)
        if lw.q_norm is not None and lw.k_norm is not None:
            # the norm kernels take rows of unit stride: un-interleave q/k from the fused output
            q = ops.rms_norm(q.contiguous(), lw.q_norm, c.rms_eps)
            k = ops.rms_norm(k.contiguous(), lw.k_norm, c.rms_eps)
        ops.rope_(q, k, positions, c.layer_rope_theta(i), c.rope_neox, c.rotary_dim)
        out = attend(i, q, k, v)
        return ops.linear(out.reshape(T, c.q_dim), lw.wo)

    def _mlp(self, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        return ops.linear(ops.gated_act(ops.linear(h, lw.w_gate_up), self.cfg.activation), lw.w_down)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Final-normed hidden states [T, d] of ``tokens`` at ``positions``."""
        c, w = self.cfg, self.w
        x = self.embed(tokens)
        h = ops.rms_norm(x, w.layers[0].attn_norm, c.rms_eps)
        for i, lw in enumerate(w.layers):
            o = self._attention(i, lw, h, positions, attend)
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
        return ops.logits_fp32(h_last, self.w.lm_head)[0]

    # --- prefill: a run of prompt tokens at known (host-side) positions ---------------------

    def prefill(
        self, tokens: torch.Tensor, start: int, last: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run ``tokens`` at positions start.. (filling the cache); fp32 logits of the last one.

        ``last`` (a device index [1]) picks another row than the final one: a
        graph-captured prefill runs a padded bucket of tokens and returns the
        logits of the last real token. Padding rows come after every real row,
        so causal attention keeps them out of the real rows' results; the K/V
        they write lies past the sequence and is overwritten by decode before
        anything reads it.
        """
        T = tokens.shape[0]
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        end = start + T

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = self.kv.k[i], self.kv.v[i]
            kc[start:end].copy_(k)
            vc[start:end].copy_(v)
            window = self.cfg.layer_window(i)
            lo = 0 if window is None else max(0, start - window + 1)  # older keys are masked anyway
            return ops.attention_prefill(
                q, kc[lo:end], vc[lo:end], self.cfg.attn_scale, sliding_window=window, q_offset=start - lo
            )

        h = self.hidden(tokens, positions, attend)
        return self.logits(h[-1:] if last is None else h.index_select(0, last))

    # --- decode: one token whose position lives on the device (CUDA-graph safe) -------------

    def decode(self, token: torch.Tensor, pos: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """One step for ``token`` [1] at ``pos`` [1] with ``seq_len`` [1] = pos + 1; fp32 logits [V].

        Reads positions only on the device, never on the host, so the same
        launches replay correctly from a captured CUDA graph.
        """

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = self.kv.k[i], self.kv.v[i]
            ops.kv_write_(kc, vc, k[0], v[0], pos)
            out = ops.attention_decode(
                q[0], kc, vc, seq_len, self.cfg.attn_scale, sliding_window=self.cfg.layer_window(i)
            )
            return out[None]

        h = self.hidden(token, pos, attend)
        return self.logits(h)
