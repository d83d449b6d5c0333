"""One step's sampling time, per-row loop vs batched sampler, for mixed rows at Qwen's vocabulary.

    python3 benchmarks/bench_sampler.py [--vocab 151936] [--rows 1 8 64] [--iters 20]

Each row cycles through greedy, top-k, top-p, min-p, penalties and a grammar mask (the GPU
test's mix). The time is wall clock per step, host work and the one read of the ids included
(what the engine loop waits for). CUDA only; reported, not asserted.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_kernels_sampling_batched import kind_cases, specs_of  # noqa: E402

from worker_orcd.engine import ops  # noqa: E402
from worker_orcd.engine.sample_rows import SampleRows  # noqa: E402
from worker_orcd.engine.sampler import row_params  # noqa: E402


def per_step_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    for n in args.rows:
        cases = kind_cases(random.Random(n), n, args.vocab)
        logits = (torch.randn(n, args.vocab, generator=gen) * 3).cuda()
        rows = SampleRows.stack([row_params(s) for s in specs_of(cases)], args.vocab)
        each = per_step_ms(lambda: ops.sample_each(logits, rows).tolist(), args.iters)
        batched = per_step_ms(lambda: ops.sample_batch(logits, rows).tolist(), args.iters)
        print(f"rows {n:3d}: per-row loop {each:8.3f} ms   batched {batched:7.3f} ms   ({each / batched:5.1f}x)")


if __name__ == "__main__":
    main()
