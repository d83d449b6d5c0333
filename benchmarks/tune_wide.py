"""Wide-tile dense matmul (wgmma) against the 16-row kernel on the GPU: bitwise rows, speed per M.

For every real Qwen2.5 shape and M, each wide candidate (BM, BN, BK, warps, stages) is run on
the same rows as the 16-row kernel (``wide=False``) and counts only if every row is bitwise
equal (batch invariance across the WIDE_MIN_M switch); fp16 timed (CUDA graph cycling through
weight copies that defeat L2, as tune_dense.py), bf16 checked for equality only. Prints a table
with TFLOP/s and GB/s; JSON to $OUT/tune_wide.json.

    python benchmarks/tune_wide.py --model 0.5b 7b --m 1 16 64 128 256 512 1024
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tune_dense import L2_BYTES, SHAPES, graph_ms  # noqa: E402

from worker_orcd.engine.kernels import matmul_dense as D  # noqa: E402

CANDS = [(64, 32, 64, 4, 4), (64, 32, 128, 4, 3), (64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3),
         (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["0.5b", "7b"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16, 64, 128, 256, 512, 1024])
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args()
    t_end = time.time() + args.budget_s
    torch.manual_seed(0)
    rows = []
    for model in args.model:
        for name, n, k in SHAPES[model]:
            if D.split_k(n, k) > 1:
                continue
            copies = max(1, min(16, L2_BYTES // (n * k * 2)))
            ws = [(torch.randn(n, k, device="cuda") * 0.02).half() for _ in range(copies)]
            wb = ws[0].bfloat16()
            pool = torch.randn(max(args.m), k, device="cuda").half()
            for m in args.m:
                if time.time() > t_end:
                    break
                x = pool[:m].contiguous()
                ref = D.dense_matmul(x, ws[0], wide=False)
                refb = D.dense_matmul(x.bfloat16(), wb, wide=False)
                narrow_ms = graph_ms([lambda w=w: D.dense_matmul(x, w, wide=False) for w in ws])
                r = {"model": model, "matrix": name, "N": n, "K": k, "M": m, "narrow_ms": narrow_ms,
                     "default_wide": D.wide_config(m, n, 1), "cands": {}}
                for c in CANDS:
                    try:
                        out = D.dense_matmul(x, ws[0], wide=c)
                        outb = D.dense_matmul(x.bfloat16(), wb, wide=c)
                    except Exception as e:  # noqa: BLE001 - out of resources for this tile
                        r["cands"][str(c)] = type(e).__name__
                        continue
                    same = bool(torch.equal(out, ref)) and bool(torch.equal(outb, refb))
                    ms = graph_ms([lambda w=w: D.dense_matmul(x, w, wide=c) for w in ws])
                    r["cands"][str(c)] = {"ms": ms, "identical": same}
                ok = {c: v["ms"] for c, v in r["cands"].items() if isinstance(v, dict) and v["identical"]}
                bad = [c for c, v in r["cands"].items() if isinstance(v, dict) and not v["identical"]]
                best = min(ok, key=ok.get) if ok else None
                r.update(best=best, best_ms=ok.get(best), non_identical=bad)
                rows.append(r)
                print(json.dumps(r), flush=True)
    print("\n| model | matrix | M | 16-row ms | TFLOP/s | best wide ms | TFLOP/s | GB/s | best wide | non-identical |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        fl = 2 * r["M"] * r["N"] * r["K"] / 1e12
        bw = r["best_ms"] or float("nan")
        print(f"| {r['model']} | {r['matrix']} | {r['M']} | {r['narrow_ms']:.4f} | {fl / r['narrow_ms'] * 1e3:.0f} | "
              f"{bw:.4f} | {fl / bw * 1e3:.0f} | {r['N'] * r['K'] * 2 / 1e6 / bw:.0f} | {r['best']} | "
              f"{len(r['non_identical'])} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tune_wide.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
