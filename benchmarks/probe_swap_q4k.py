"""Probe: Q4_K matmul with the operands swapped (yᵀ = W · xᵀ), the dequantized weight as the
tensor-core A operand straight from registers, against the tiled kernel and the dense fp16 kernel.

Why: ``qmatmul_tiled`` puts the dequantized weight in the B operand, which Hopper's wgmma reads
from shared memory only, so every weight element makes a trip through shared memory after its
dequantization (0.26-1.6 TB/s, instruction-bound). With the weight as A (64 weight rows per
warpgroup, registers allowed) and the tokens as the dot's N (16 at decode), that trip goes.
Dequantization stays exactly ggml's (fp32, no FMA contraction, one rounding), so the rows may
equal the dense residency's bit for bit; the probe measures whether they do, whether they are
the same at every M (batch invariance), and the speed. Optional fixed K split (per shape, never
per M): partials in fp32, added in split order by torch (the probe times the matmul part).
The product's form of this (``qmatmul_tiled``'s swapped form, every tiled type, ``k_segments``)
came out of it; the probe stays for what the product does not have: the fp16-arithmetic
dequantization (``MAGIC``) and a free choice of tiles and splits. Its "tiled" column is the
unswapped form (``swap=False``).

    python benchmarks/probe_swap_q4k.py --m 1 16 64 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from bench_qmatmul import random_weight  # noqa: E402
from tune_dense import L2_BYTES, graph_ms  # noqa: E402

from worker_orcd.engine.kernels import matmul_dense as D  # noqa: E402
from worker_orcd.engine.kernels import qmatmul_tiled as T  # noqa: E402
from worker_orcd.engine.kernels.qmatmul_tiled import _k4_scale_min, _u2f  # noqa: E402
from worker_orcd.gguf.constants import GGMLType  # noqa: E402

@triton.jit(do_not_specialize=["M"])
def q4k_swap_kernel(x_ptr, w_ptr, w16_ptr, w32_ptr, y_ptr, M, N, K, stride_xm, RB, SB_PER_SPLIT,
                    BNW: tl.constexpr, BT: tl.constexpr, MAGIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    s = tl.program_id(2)
    n = (pid_n * BNW + tl.arange(0, BNW)).to(tl.int64)[:, None]
    nm = n < N
    t = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = t[None, :] < M
    l32 = tl.arange(0, 32)
    acc = tl.zeros((BNW, BT), dtype=tl.float32)
    sb_lo = s * SB_PER_SPLIT
    sb_hi = tl.minimum(K // 256, sb_lo + SB_PER_SPLIT)
    for sb in range(sb_lo, sb_hi):
        base = n * RB + sb * 144
        d = tl.load(w16_ptr + base // 2, mask=nm, other=0.0).to(tl.float32)
        dmin = tl.load(w16_ptr + base // 2 + 1, mask=nm, other=0.0).to(tl.float32)
        w1 = tl.load(w32_ptr + base // 4 + 1, mask=nm, other=0)
        w2 = tl.load(w32_ptr + base // 4 + 2, mask=nm, other=0)
        w3 = tl.load(w32_ptr + base // 4 + 3, mask=nm, other=0)
        for c in tl.static_range(4):
            qb = tl.load(w_ptr + base + 16 + 32 * c + l32[None, :], mask=nm, other=0).to(tl.int32)
            k0 = sb * 256 + 64 * c
            sc, mn = _k4_scale_min(w1, w2, w3, 2 * c)
            if MAGIC:  # fp16 arithmetic (not ggml's rounding): q exact in fp16 by the 1024 trick
                q = ((qb & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
                wl = q * (d * sc).to(tl.float16) - (dmin * mn).to(tl.float16)
            else:
                wl = ((d * sc) * _u2f(qb & 15, 8388608.0) - dmin * mn).to(tl.float16)
            xt = tl.load(x_ptr + t[None, :] * stride_xm + (k0 + l32)[:, None], mask=tmask, other=0.0)
            acc = tl.dot(wl, xt, acc)
            sc, mn = _k4_scale_min(w1, w2, w3, 2 * c + 1)
            if MAGIC:
                q = ((qb >> 4) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
                wh = q * (d * sc).to(tl.float16) - (dmin * mn).to(tl.float16)
            else:
                wh = ((d * sc) * _u2f(qb >> 4, 8388608.0) - dmin * mn).to(tl.float16)
            xt = tl.load(x_ptr + t[None, :] * stride_xm + (k0 + 32 + l32)[:, None], mask=tmask, other=0.0)
            acc = tl.dot(wh, xt, acc)
    yp = y_ptr + s.to(tl.int64) * M * N + t[None, :] * N + n
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=nm & tmask)


def swap_matmul(x: torch.Tensor, w, cfg: tuple[int, int, int, int, int], magic: bool = False) -> torch.Tensor:
    """cfg: (BNW weight rows, BT tokens, warps, stages, splits)."""
    bnw, bt, warps, stages, splits = cfg
    M, K = x.shape
    nsb = K // 256
    per = -(-nsb // splits)
    s = -(-nsb // per)
    raw = w.raw
    out = torch.empty((s, M, w.n), dtype=torch.float32 if s > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(w.n, bnw), triton.cdiv(M, bt), s)
    q4k_swap_kernel[grid](x, raw, raw.view(torch.int16).view(torch.float16), raw.view(torch.int32), out,
                          M, w.n, K, x.stride(0), w.row_bytes, per, BNW=bnw, BT=bt, MAGIC=magic,
                          num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return out[0] if s == 1 else out


SHAPES = [("gate_up", 37888, 3584), ("qkv", 4608, 3584), ("o", 3584, 3584), ("down", 3584, 18944)]
CFGS = [(64, 16, 4, 3, 1), (64, 16, 4, 4, 1), (128, 16, 8, 3, 1), (64, 32, 4, 3, 1), (64, 64, 4, 3, 1),
        (64, 16, 4, 3, 2), (64, 16, 4, 3, 4), (64, 16, 4, 3, 8), (128, 16, 8, 3, 4)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, n, k in SHAPES:
        if name not in args.shapes:
            continue
        w0 = random_weight(GGMLType.Q4_K, n, k, gen)
        ws = [w0] + [random_weight(GGMLType.Q4_K, n, k, gen) for _ in range(max(0, min(8, L2_BYTES // w0.raw.numel()) - 1))]
        w16 = w0.dequantize(torch.float32).half()
        d16 = [w16] + [w16.clone() for _ in range(max(0, min(8, L2_BYTES // (n * k * 2)) - 1))]
        pool = torch.randn(max(args.m), k, device="cuda", generator=gen).half()
        ref_big = D.dense_matmul(pool, w16)
        ref64 = w0.dequantize(torch.float32).double()
        for m in args.m:
            x = pool[:m].contiguous()
            dense = D.dense_matmul(x, w16)
            exact = (x.double() @ ref64.T)
            r = {"matrix": name, "N": n, "K": k, "M": m,
                 "dense_ms": graph_ms([lambda w=w: D.dense_matmul(x, w) for w in d16]),
                 "tiled_ms": graph_ms([lambda w=w: T.qmatmul_tiled(x, w, None, torch.empty(m, n, dtype=torch.half, device="cuda"), swap=False) for w in ws]),
                 "tiled_eq_segments": bool(torch.equal(T.qmatmul_tiled(x, w0, None, torch.empty(m, n, dtype=torch.half, device="cuda"), swap=False),
                                                        T.segments_reference(x, w16))),
                 "dense_err": (dense.double() - exact).abs().max().item(), "cands": {}}
            for cfg in CFGS:
                for magic in (False, True):
                    key = f"{cfg}{' magic' if magic else ''}"
                    try:
                        out = swap_matmul(x, w0, cfg, magic)
                        y = out if out.dim() == 2 else out.sum(0).half()
                        ms = graph_ms([lambda w=w: swap_matmul(x, w, cfg, magic) for w in ws])
                    except Exception as e:  # noqa: BLE001
                        r["cands"][key] = f"{type(e).__name__}: {str(e)[:120]}"
                        continue
                    big = swap_matmul(pool, w0, cfg, magic)
                    yb = big if big.dim() == 2 else big.sum(0).half()
                    r["cands"][key] = {"ms": round(ms, 4), "GBps": round(w0.raw.numel() / ms / 1e6),
                                       "eq_dense": bool(torch.equal(y, dense)),
                                       "invariant": bool(torch.equal(y, yb[:m])),
                                       "err": (y.double() - exact).abs().max().item()}
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| matrix | M | dense ms | tiled ms | best swap ms | GB/s | cfg | eq dense | invariant | err / dense err |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|---|")
    for r in rows:
        ok = {c: v for c, v in r["cands"].items() if isinstance(v, dict)}
        if not ok:
            print(f"| {r['matrix']} | {r['M']} | {r['dense_ms']:.4f} | {r['tiled_ms']:.4f} | - | - | none ran | | | |")
            continue
        for magic in (False, True):
            sel = {c: v for c, v in ok.items() if c.endswith("magic") == magic}
            if not sel:
                continue
            c = min(sel, key=lambda c: sel[c]["ms"])
            v = sel[c]
            print(f"| {r['matrix']} | {r['M']} | {r['dense_ms']:.4f} | {r['tiled_ms']:.4f} | {v['ms']:.4f} | {v['GBps']} | {c} | "
                  f"{v['eq_dense']} | {v['invariant']} | {v['err']:.2e} / {r['dense_err']:.2e} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_swap_q4k.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
