"""Q4_K/Q6_K decode matmuls with packed-half2 dequantization (``qmatmul_tiled(..., half2=True)``) against today's.

The quantized residency's decode step is 6.6 ms on a 7B Q4_K_M where the weight bytes allow ~1.3
(RESULTS.md); the swapped kernel's loop body spends ~12 instructions per weight on ggml's fp32
dequantization. ``half2`` does it in fp16x2 (SASS, swapped form, per super-block and thread: Q4_K
1,120 instead of 1,608 instructions, Q6_K 1,496 instead of 1,880). This measures whether that is the
limiter: per 7B Q4_K_M matrix and M, ms per
launch (CUDA graph, weight copies past L2, as tune_qtiled.py) for both, and checks each form's rows
bit for bit against its reference (the dense kernel's segment chains on ggml's weight, resp. on
``half2_weight``). Markdown table; JSON to $OUT/probe_half2.json.

    python benchmarks/probe_half2.py --m 1 16 64
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
from tune_dense import L2_BYTES, graph_ms  # noqa: E402
from tune_qtiled import resident  # noqa: E402

from worker_orcd.engine.kernels import qmatmul_tiled as T  # noqa: E402
from worker_orcd.gguf.constants import GGMLType  # noqa: E402

Q4K, Q6K = GGMLType.Q4_K, GGMLType.Q6_K
CASES = [("gate_up", 37888, 3584, Q4K), ("head", 152064, 3584, Q6K), ("down", 3584, 18944, Q6K),
         ("down", 3584, 18944, Q4K), ("qkv", 4608, 3584, Q4K), ("o", 3584, 3584, Q4K)]  # a 7B Q4_K_M's matrices


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16, 64])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print("| 7B matrix | type | M | ggml fp32 dequant ms | half2 ms | speed-up | half2 GB/s | rows bitwise (ggml / half2) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, n, k, t in CASES:
        w0 = resident(t, n, k, gen)
        ws = [w0] + [resident(t, n, k, gen) for _ in range(max(0, min(8, L2_BYTES // w0.raw.numel()) - 1))]
        wd = w0.dequantize(torch.float32).to(torch.float16)
        wh = T.half2_weight(w0)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.float16)
            out = torch.empty(m, n, dtype=torch.float16, device="cuda")
            same = (torch.equal(T.qmatmul_tiled(x, w0, None, out.clone()), T.segments_reference(x, wd)),
                    torch.equal(T.qmatmul_tiled(x, w0, None, out.clone(), half2=True), T.segments_reference(x, wh)))
            base = graph_ms([lambda w=w: T.qmatmul_tiled(x, w, None, out) for w in ws])
            fast = graph_ms([lambda w=w: T.qmatmul_tiled(x, w, None, out, half2=True) for w in ws])
            gbs = w0.raw.numel() / fast / 1e6
            r = dict(matrix=name, type=t.name, n=n, k=k, m=m, ggml_ms=base, half2_ms=fast, half2_gb_s=gbs, bitwise=same)
            rows.append(r)
            print(f"| {name} {n}x{k} | {t.name} | {m} | {base:.4f} | {fast:.4f} | {base / fast:.2f}x | {gbs:,.0f} | "
                  f"{'yes' if same[0] else 'NO'} / {'yes' if same[1] else 'NO'} |", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_half2.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(all(r["bitwise"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
