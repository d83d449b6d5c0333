"""Seal-fingerprint speed on the GPU: the checksum kernel's launch shape vs a plain read ceiling.

    python benchmarks/tune_checksum.py --gb 15.2

Times ChecksumPlan.digest() as shipped, the words kernel under other
(BLOCK, ITERS, num_warps) splits of the same 128 KiB tile, and a trivial
read-and-add kernel (the bandwidth ceiling for one pass). Diagnosis tool.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import importlib  # noqa: E402

ck = importlib.import_module("worker_orcd.engine.kernels.checksum")


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    base = pid * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for it in range(ITERS):
        offs = base + it * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=15.2)
    args = ap.parse_args()
    n_bytes = int(args.gb * 1e9) // 16 * 16
    buf = torch.randint(-(2**31), 2**31 - 1, (n_bytes // 4,), dtype=torch.int32, device="cuda")
    plan = ck.ChecksumPlan([buf])
    rows = []
    t = ms(plan.digest)
    rows.append(("shipped digest()", t))
    part = torch.empty(plan.n_word_tiles, dtype=torch.int64, device="cuda")
    for block, iters in ((4096, 8), (2048, 16), (8192, 4), (1024, 32)):
        for warps in (4, 8, 16):
            fn = lambda b=block, i=iters, w=warps: ck._words_kernel[(plan.n_word_tiles,)](  # noqa: E731
                plan.word_table, part, BLOCK=b, ITERS=i, num_warps=w
            )
            rows.append((f"words BLOCK={block} ITERS={iters} warps={warps}", ms(fn)))
    n = buf.numel()
    out = torch.empty(triton.cdiv(n, 4096 * 8), dtype=torch.int32, device="cuda")
    for warps in (4, 8):
        fn = lambda w=warps: _read_kernel[(triton.cdiv(n, 4096 * 8),)](buf, out, n, BLOCK=4096, ITERS=8, num_warps=w)  # noqa: E731
        rows.append((f"plain read ceiling warps={warps}", ms(fn)))
    print(f"buffer {n_bytes / 1e9:.2f} GB")
    for name, t in rows:
        print(f"{name:45s} {t:7.3f} ms  {n_bytes / t / 1e6:7.0f} GB/s")


if __name__ == "__main__":
    main()
