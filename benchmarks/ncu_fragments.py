"""One decode launch per fragment-order matrix, for Nsight Compute: where a launch's time goes (occupancy,
registers, DRAM throughput, warp stall reasons) when timing variants alone cannot say.

probe_fragments.py times the launches; this script only runs them, once each after a warm-up, so that
``ncu --kernel-name regex:fragments_kernel --launch-skip-before-match 0`` profiles exactly those launches
(the in-launch segment sum, as the engine runs them at M <= 16):

    ncu --clock-control none --kernel-name regex:fragments_kernel --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        python3 benchmarks/ncu_fragments.py --case 7b:gate_up:Q4_K --m 1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from probe_fragments import CASES  # noqa: E402
from tune_qtiled import resident  # noqa: E402

from worker_orcd.engine.kernels import fragments as F  # noqa: E402
from worker_orcd.engine.qlayout import q6k_to_fragments, q8_to_fragments, to_fragments  # noqa: E402
from worker_orcd.engine.qweight import QWeight  # noqa: E402
from worker_orcd.gguf.constants import GGMLType  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, help="MODEL:MATRIX:TYPE as in probe_fragments.CASES, e.g. 7b:gate_up:Q4_K")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--stages", type=int, default=None, help="pipeline depth (default: fragments.swap_stages)")
    ap.add_argument("--launches", type=int, default=2, help="launches in all (the first compiles)")
    args = ap.parse_args()
    found = [c for c in CASES if f"{c[0]}:{c[1]}:{c[4].name}" == args.case]
    if not found:
        ap.error(f"unknown case {args.case!r}; known: {', '.join(f'{c[0]}:{c[1]}:{c[4].name}' for c in CASES)}")
    _, _, n, k, t = found[0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = resident(t, n, k, gen)
    pack = {GGMLType.Q4_K: to_fragments, GGMLType.Q6_K: q6k_to_fragments, GGMLType.Q8_0: q8_to_fragments}[t]
    w = QWeight(pack(blocks.gguf_bytes(), n, k), t, n, k, half2=t != GGMLType.Q8_0, fragments=True)
    w = dataclasses.replace(w, locks=torch.zeros(n // 64 * 4, dtype=torch.int32, device="cuda"))
    x = torch.randn(args.m, k, device="cuda", generator=gen).to(torch.float16)
    out = torch.empty(args.m, n, dtype=torch.float16, device="cuda")
    for _ in range(args.launches):
        F.fragments_matmul(x, w, None, out, stages=args.stages)
    torch.cuda.synchronize()
    print(f"{args.case} M={args.m} stages={args.stages}: {args.launches} launches, weight {w.raw.numel() / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
