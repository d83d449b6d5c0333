"""Does the K of one ``tl.dot`` change a row's bits? (why qmatmul_tiled's 16-row form differed)

The dense kernel's 16-row form (``mma.sync``) with BK = 32, 64 and 128 inputs per dot, and its
wgmma form, on real 7B/0.5B shapes at M = 1 and 16: prints whether each variant's rows are
bitwise equal to the BK = 64 16-row rows. qmatmul_tiled chains K = 32 dots; if BK = 32 alone
differs here, the K of the dot is what changes the arithmetic (a K = 64 form would fix it).

    python benchmarks/probe_dot_k.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from worker_orcd.engine.kernels import matmul_dense as D  # noqa: E402

SHAPES = [("7b qkv", 4608, 3584), ("7b gate_up", 37888, 3584), ("0.5b gate_up", 9728, 896)]


def main() -> int:
    torch.manual_seed(0)
    print("| shape | M | BK 32 | BK 128 | wgmma 64x64 | max |diff| BK 32 |")
    print("|---|---:|---|---|---|---:|")
    for name, n, k in SHAPES:
        w = (torch.randn(n, k, device="cuda") * 0.02).half()
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").half()
            ref = D.dense_matmul(x, w, splits=1, config=(32, 64, 4, 3, 1))
            k32 = D.dense_matmul(x, w, splits=1, config=(32, 32, 4, 3, 1))
            k128 = D.dense_matmul(x, w, splits=1, config=(32, 128, 4, 3, 1))
            wide = D.dense_matmul(x, w, splits=1, wide=(64, 64, 64, 4, 4))
            diff = (k32.float() - ref.float()).abs().max().item()
            print(f"| {name} | {m} | {torch.equal(k32, ref)} | {torch.equal(k128, ref)} | {torch.equal(wide, ref)} | {diff:.3g} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
