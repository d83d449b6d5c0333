"""Sweep qmatmul launch configurations per (weight shape, M) on the GPU, keeping only bit-identical ones.

Batch invariance allows a configuration to change with M only if every output
element stays bit-identical: BLOCK_K, the 16-row dot and the K order are fixed;
BLOCK_N, num_warps, num_stages and GROUP_M are candidates. Each candidate's
output is compared bitwise with the reference configuration's on the same
inputs; the fastest identical one per (shape, M) is printed as a table and
written to $OUT/tune_qmatmul.json.

    python benchmarks/tune_qmatmul.py --type F16 --model 0.5b 7b
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from worker_orcd.engine.kernels import qmatmul as Q  # noqa: E402
from worker_orcd.engine.qweight import QWeight  # noqa: E402
from worker_orcd.gguf.constants import GGMLType  # noqa: E402

SHAPES = {  # (name, N, K) of each matrix a step multiplies
    "0.5b": [("qkv", 1152, 896), ("o", 896, 896), ("gate_up", 9728, 896), ("down", 896, 4864), ("head", 151936, 896)],
    "7b": [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944),
           ("head", 152064, 3584)],
}


def launch(x, w, out, bn, warps, stages, gm):  # noqa: ANN001, ANN201
    src = w.raw.view(torch.float16)
    M = x.shape[0]
    grid = (triton.cdiv(w.n, bn), triton.cdiv(M, gm * Q.BLOCK_M))
    Q.qmatmul_kernel[grid](
        x, src, out, out, M, w.n, w.k, x.stride(0), out.stride(0), w.row_bytes,
        WTYPE=int(w.ggml_type), HAS_BIAS=False, GROUP_M=gm, BM=Q.BLOCK_M, BN=bn, BK=Q.BLOCK_K,
        num_warps=warps, num_stages=stages, enable_fp_fusion=False,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["0.5b", "7b"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16, 64, 256])
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for model in args.model:
        for name, n, k in SHAPES[model]:
            wt = (torch.randn(n, k, device="cuda") * 0.02).half()
            w = QWeight(wt.view(torch.uint8).reshape(-1), GGMLType.F16, n, k)
            for m in args.m:
                x = torch.randn(m, k, device="cuda").half()
                ref = torch.empty(m, n, device="cuda", dtype=torch.float16)
                launch(x, w, ref, Q.BLOCK_N, Q.NUM_WARPS, 3, Q.group_m(m))
                base_ms = triton.testing.do_bench(lambda: launch(x, w, ref, Q.BLOCK_N, Q.NUM_WARPS, 3, Q.group_m(m)),
                                                  return_mode="median")
                best = (base_ms, (Q.BLOCK_N, Q.NUM_WARPS, 3, Q.group_m(m)))
                bad = 0
                for bn, warps, stages, gm in itertools.product((16, 32, 64, 128), (2, 4, 8), (2, 4), (1, 2, 4)):
                    if gm > 1 and m <= 16 * (gm // 2):
                        continue
                    out = torch.empty_like(ref)
                    try:
                        launch(x, w, out, bn, warps, stages, gm)
                    except Exception:  # noqa: BLE001 - out of resources for this tile
                        continue
                    if not torch.equal(out, ref):
                        bad += 1
                        continue
                    ms = triton.testing.do_bench(lambda: launch(x, w, out, bn, warps, stages, gm), warmup=5, rep=20,
                                                 return_mode="median")
                    if ms < best[0]:
                        best = (ms, (bn, warps, stages, gm))
                gb = n * k * 2 / 1e9
                r = {"model": model, "matrix": name, "N": n, "K": k, "M": m, "base_ms": base_ms, "best_ms": best[0],
                     "best": best[1], "gbps_best": gb / (best[0] / 1e3), "non_identical": bad}
                rows.append(r)
                print(json.dumps(r), flush=True)
    print("\n| model | matrix | M | base ms | best ms | GB/s | BN, warps, stages, GROUP_M | non-identical |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['matrix']} | {r['M']} | {r['base_ms']:.4f} | {r['best_ms']:.4f} | "
              f"{r['gbps_best']:.0f} | {r['best']} | {r['non_identical']} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tune_qmatmul.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
