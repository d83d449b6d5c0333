"""Quantized weights at prefill sizes: dequantize the matrix into scratch once, then the dense kernel.

At M >= PREFILL_MIN_M the fused kernel (``qmatmul_tiled``) is instruction-bound (every row tile
re-dequantizes the weight tile): a 512-token 7B Q4_K_M prefill step took 49 ms against the dense
fp16 kernel's 17.6 (RESULTS, fifth session). Here the matrix is dequantized once into an fp16
scratch [N, K] and multiplied by the dense wide-tile kernel in its segmented form: one fp32 chain per
fixed K segment (``qmatmul_tiled.k_segments``, a function of the shape only), the chains added in
segment order, the bias after them, rounded once. That is ``segments_reference``, which the GPU
tests hold bitwise equal to ``qmatmul_tiled`` at every M: a row's bits do not depend on which of the
two computed it (batch invariance across the threshold). (A first form ran one dense launch per
segment into fp32 [M, N] partials and added them with torch: 58 ms per 512 tokens on the 7B, the
partials' traffic; the segmented kernel keeps them in registers, and since the fifteenth session
runs them as one pipelined loop that restarts its chain at each segment's end: 32.8 -> 27.2 ms.)

Dequantization (``dequant.dequantize``) computes the gguf values in fp32 and rounds them once to the
activation dtype, as the fused kernels round their in-register values.
"""

from __future__ import annotations

import torch

from ...gguf.constants import BLOCK_LAYOUT
from ..dequant import dequantize
from ..qweight import QWeight
from . import matmul_dense  # a module reference: matmul_dense imports qmatmul, which imports this
from . import qmatmul_tiled  # the segments (a module reference: qmatmul_tiled imports qmatmul, which imports this)

# Rows from which a quantized matmul takes this path on CUDA (decode and small mixed steps keep the
# fused kernels, which read each weight byte once). Not yet tuned on a GPU.
PREFILL_MIN_M = 256


def segment_weight(w: QWeight, lo: int, hi: int, dtype: torch.dtype, gguf: torch.Tensor | None = None) -> torch.Tensor:
    """W[:, lo:hi] dequantized, contiguous [N, hi - lo] in ``dtype`` (the fp32 values rounded once).
    ``gguf``: the weight's file-order blocks (``w.gguf_bytes()``), when the caller already has them."""
    layout = BLOCK_LAYOUT[w.ggml_type]
    if lo % layout.block_size or (hi % layout.block_size and hi != w.k):
        raise ValueError(f"segment [{lo}, {hi}) of a {w.ggml_type.name} row is not whole blocks")
    g = w.gguf_bytes() if gguf is None else gguf
    if lo == 0 and hi == w.k:
        raw = g
    else:
        b0, b1 = lo // layout.block_size * layout.type_size, hi // layout.block_size * layout.type_size
        raw = g.view(w.n, w.row_bytes)[:, b0:b1].contiguous().view(-1)
    # 16-bit outputs are the fp32 values rounded once (tests/test_dequant.py holds them to it)
    return dequantize(raw, w.ggml_type, w.n * (hi - lo), dtype).view(w.n, hi - lo)


def qmatmul_dequant(x: torch.Tensor, w: QWeight, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W[N, K].T (+ bias), the rows of ``qmatmul_tiled`` bit for bit (``out``
    may be a column slice; ``qmatmul`` checked the shapes)."""
    ks, _ = qmatmul_tiled.k_segments(w.n, w.k)
    if w.half2 or w.fragments:  # the fused kernels' own values, by their own code
        wd = qmatmul_tiled.half2_dequant(w)
    else:
        wd = segment_weight(w, 0, w.k, x.dtype)  # the whole matrix, once (the VRAM plan's scratch)
    return matmul_dense.dense_matmul(x, wd, bias, out=out, segment=ks)
