"""Q4_K/Q6_K matmuls with the weight in fragment order (``kernels/fragments.py``) against the half2 kernel.

Per Q4_K / Q6_K matrix of a 1.5B, 7B and 72B and per M: ms per launch (CUDA graph, weight copies past L2,
as tune_qtiled.py) of ``qmatmul_tiled(..., half2=True)`` on the file's blocks (Q6_K: ``qlayout``'s planes)
and of ``fragments_matmul`` on the same weight in fragment order; whether their rows are bitwise equal
(they must be: the same values, the same chains), and whether ``fragments_dequant`` equals ``half2_dequant``. Markdown table; JSON to $OUT/probe_fragments.json; exit 1 on any mismatch.

    python benchmarks/probe_fragments.py --m 1 16 64 128 256
    python benchmarks/probe_fragments.py --m 1 16 --models 1.5b 7b --segments 1024:8 512:8 2048:16 256:4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tune_dense import L2_BYTES, graph_ms  # noqa: E402
from tune_qtiled import resident  # noqa: E402

from worker_orcd.engine.kernels import fragments as F  # noqa: E402
from worker_orcd.engine.qlayout import q6k_to_fragments, q8_to_fragments, to_fragments  # noqa: E402
from worker_orcd.engine.kernels import qmatmul_tiled as T  # noqa: E402
from worker_orcd.engine.qweight import QWeight  # noqa: E402
from worker_orcd.gguf.constants import GGMLType  # noqa: E402

Q4K, Q6K, Q80 = GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0
CASES = [("7b", "gate_up", 37888, 3584, Q4K), ("7b", "down", 3584, 18944, Q6K), ("7b", "head", 152064, 3584, Q6K),
         ("7b", "down", 3584, 18944, Q4K), ("7b", "q", 3584, 3584, Q4K), ("7b", "k", 512, 3584, Q4K), ("7b", "v", 512, 3584, Q6K),
         ("7b", "o", 3584, 3584, Q4K), ("1.5b", "gate_up", 17920, 1536, Q4K), ("1.5b", "down", 1536, 8960, Q6K),
         ("1.5b", "q", 1536, 1536, Q4K), ("72b", "gate_up", 59136, 8192, Q4K), ("72b", "down", 8192, 29568, Q80),
         ("7b", "gate_up", 37888, 3584, Q80), ("7b", "head", 152064, 3584, Q80), ("0.5b", "gate_up", 9728, 896, Q80),
         ("0.5b", "down", 896, 4864, Q80), ("0.5b", "head", 151936, 896, Q80)]  # a 0.5B's K = 896: Q8_0, not K-quants


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16, 64, 128, 256])
    ap.add_argument("--sweep", action="store_true", help="stages 2/3/4 of the swapped form at the smallest M")
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--models", nargs="+", default=None, help="only these CASES models (e.g. 1.5b 7b)")
    ap.add_argument("--segments", nargs="+", default=None, metavar="TARGET:MAX",
                    help="rerun each case with qmatmul_tiled's K-segment rule at TARGET_PROGRAMS:MAX_SEGMENTS (e.g. "
                         "1024:8 512:8 2048:16): programs per matrix against latency per launch (a shape-only rule: "
                         "any choice keeps the rows batch invariant, but changes them, so the engine's is one fixed pair)")
    args = ap.parse_args()
    rules = [tuple(int(v) for v in r.split(":")) for r in (args.segments or [f"{T.TARGET_PROGRAMS}:{T.MAX_SEGMENTS}"])]
    t_end = time.time() + args.budget_s
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, bad = [], []
    print("| model | matrix | type | segments (target:max -> n) | M | blocks half2 ms | fragments ms | speed-up | fragments GB/s | rows bitwise | segments summed in the launch ms | bitwise |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|")
    order = args.models or sorted({c[0] for c in CASES}, key=[c[0] for c in CASES].index)
    cases = [(c, rule) for mdl in order for c in CASES if c[0] == mdl for rule in rules]  # in --models order
    for (model, name, n, k, t), (T.TARGET_PROGRAMS, T.MAX_SEGMENTS) in cases:
        if time.time() > t_end:
            break
        seg = f"{T.TARGET_PROGRAMS}:{T.MAX_SEGMENTS} -> {T.k_segments(n, k)[1]}"
        w0 = resident(t, n, k, gen)
        blocks = [w0] + [resident(t, n, k, gen) for _ in range(max(0, min(8, L2_BYTES // w0.raw.numel()) - 1))]
        h2 = t != Q80  # Q8_0 keeps ggml's values (both forms)
        blocks = [QWeight(b.raw, t, n, k, planar=b.planar, half2=h2) for b in blocks]
        pack = {Q4K: to_fragments, Q6K: q6k_to_fragments, Q80: q8_to_fragments}[t]
        frags = [QWeight(pack(b.gguf_bytes(), n, k), t, n, k, half2=h2, fragments=True) for b in blocks]
        assert torch.equal(frags[0].gguf_bytes(), blocks[0].gguf_bytes())
        ref = T.half2_dequant(blocks[0]) if h2 else blocks[0].dequantize(torch.float32).to("cuda").half()
        if not torch.equal(F.fragments_dequant(frags[0]), ref):
            bad.append(f"{model} {name}: fragments_dequant != half2_dequant")
        for m in args.m:
            if time.time() > t_end:
                break
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.float16)
            out = torch.empty(m, n, dtype=torch.float16, device="cuda")
            y0 = T.qmatmul_tiled(x, blocks[0], None, out.clone())
            y1 = F.fragments_matmul(x, frags[0], None, out.clone())
            same = bool(torch.equal(y0, y1))
            if not same:
                bad.append(f"{model} {name} {t.name} M={m}: rows differ (max {(y0.float() - y1.float()).abs().max().item():.3g})")
            base = graph_ms([lambda w=w: T.qmatmul_tiled(x, w, None, out) for w in blocks])
            new = graph_ms([lambda w=w: F.fragments_matmul(x, w, None, out) for w in frags])
            fused = [dataclasses.replace(w, locks=torch.zeros(n // 64 * 4, dtype=torch.int32, device="cuda")) for w in frags]
            same_f = bool(torch.equal(F.fragments_matmul(x, fused[0], None, out.clone()), y1))
            if not same_f:
                bad.append(f"{model} {name} {t.name} M={m}: the in-launch segment sum differs")
            fused_ms = graph_ms([lambda w=w: F.fragments_matmul(x, w, None, out) for w in fused])
            r = dict(model=model, matrix=name, type=t.name, n=n, k=k, m=m, segments=seg, blocks_ms=base, fragments_ms=new,
                     fused_ms=fused_ms,
                     fused_bitwise=same_f,
                     gb_s=w0.raw.numel() / new / 1e6, bitwise=same)
            if args.sweep and m == min(args.m):
                for st in (2, 3, 4):
                    r[f"stages{st}_ms"] = graph_ms([lambda w=w: F.fragments_matmul(x, w, None, out, stages=st) for w in frags])
            rows.append(r)
            print(f"| {model} | {name} {n}x{k} | {t.name} | {seg} | {m} | {base:.4f} | {new:.4f} | {base / new:.2f}x | {r['gb_s']:,.0f} | "
                  f"{'yes' if same else 'NO'} | {fused_ms:.4f} | {'yes' if same_f else 'NO'} |" + "".join(f" {kk}={vv:.4f}" for kk, vv in r.items() if kk.startswith("stages")),
                  flush=True)
    print(f"\nmismatches: {len(bad)}")
    for b in bad:
        print("  " + b)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_fragments.json").write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
