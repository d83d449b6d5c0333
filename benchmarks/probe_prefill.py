"""Where a quantized prefill chunk's matmul time goes: the fragment-order weight dequantized into scratch, the
segmented dense kernel on it, against the dense residency's plain kernel and the fused unswapped kernel.

A 7B Q4_K_M 512-token chunk takes 34 ms under ``quantized-half2`` against 17.8 dense (RESULTS, fourteenth
session). Per 7B Q4_K_M matrix and M: ms per launch (CUDA graph) of ``fragments_dequant`` into a scratch
buffer (and its GB/s of bytes read + written), ``dense_matmul(..., segment=ks)`` on that scratch, the whole
``qmatmul`` path (both), the plain ``dense_matmul`` on a resident fp16 copy (what the dense residency runs),
and ``fragments_matmul(swap=False)`` (dequantizing per row tile, no scratch). Markdown; JSON to
$OUT/probe_prefill.json.

    python benchmarks/probe_prefill.py --m 256 512
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
from tune_dense import graph_ms  # noqa: E402
from tune_qtiled import resident  # noqa: E402

from worker_orcd.engine.kernels import fragments as F  # noqa: E402
from worker_orcd.engine.kernels import qmatmul_tiled as T  # noqa: E402
from worker_orcd.engine.kernels.matmul_dense import dense_matmul  # noqa: E402
from worker_orcd.engine.kernels.qmatmul import qmatmul  # noqa: E402
from worker_orcd.engine.qlayout import q6k_to_fragments, to_fragments  # noqa: E402
from worker_orcd.engine.qweight import QWeight  # noqa: E402
from worker_orcd.gguf.constants import GGMLType  # noqa: E402

Q4K, Q6K = GGMLType.Q4_K, GGMLType.Q6_K
CASES = [("gate_up", 37888, 3584, Q4K), ("down", 3584, 18944, Q6K), ("q", 3584, 3584, Q4K), ("k", 512, 3584, Q4K),
         ("v", 512, 3584, Q6K), ("o", 3584, 3584, Q4K)]  # a 7B Q4_K_M layer's matrices (synth.py's mix)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", nargs="+", type=int, default=[256, 512])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print("| matrix | type | M | dequant ms | dequant GB/s | segmented dense ms | segmented flat ms | qmatmul path ms | "
          "plain dense ms | fused unswapped ms | equal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, n, k, t in CASES:
        w0 = resident(t, n, k, gen)
        pack = to_fragments if t == Q4K else q6k_to_fragments
        w = QWeight(pack(w0.gguf_bytes(), n, k), t, n, k, half2=True, fragments=True)
        scratch = torch.empty(n, k, dtype=torch.float16, device="cuda")
        wd = F.fragments_dequant(w).clone()  # the dense residency's resident copy (same values)
        ks, _ = T.k_segments(n, k)
        moved = w.raw.numel() + n * k * 2
        for m in args.m:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.float16)
            out = torch.empty(m, n, dtype=torch.float16, device="cuda")
            r = dict(matrix=name, type=t.name, n=n, k=k, m=m,
                     dequant_ms=graph_ms([lambda: F.fragments_dequant(w, scratch)]),
                     segmented_ms=graph_ms([lambda: dense_matmul(x, scratch, out=out, segment=ks, seg_flat=False)]),
                     flat_ms=graph_ms([lambda: dense_matmul(x, scratch, out=out, segment=ks, seg_flat=True)]),
                     path_ms=graph_ms([lambda: qmatmul(x, w, out=out)]),
                     plain_ms=graph_ms([lambda: dense_matmul(x, wd, out=out)]),
                     fused_ms=graph_ms([lambda: F.fragments_matmul(x, w, None, out, swap=False)]))
            outs = [f().clone() for f in (lambda: dense_matmul(x, scratch, out=out, segment=ks, seg_flat=False),
                                          lambda: dense_matmul(x, scratch, out=out, segment=ks, seg_flat=True),
                                          lambda: qmatmul(x, w, out=out))]
            r["equal"] = all(torch.equal(o, outs[0]) for o in outs)  # the two segmented forms and the path: bitwise
            r["dequant_gb_s"] = moved / r["dequant_ms"] / 1e6
            rows.append(r)
            print(f"| {name} {n}x{k} | {t.name} | {m} | {r['dequant_ms']:.4f} | {r['dequant_gb_s']:,.0f} | "
                  f"{r['segmented_ms']:.4f} | {r['flat_ms']:.4f} | {r['path_ms']:.4f} | {r['plain_ms']:.4f} | {r['fused_ms']:.4f} | "
                  f"{'yes' if r['equal'] else 'NO'} |", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_prefill.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
