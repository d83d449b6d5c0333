"""Fused dequant-matmul benchmark on the GPU: every fused type x M on a 7B-shaped weight.

For each type and M in {1, 8, 32, 64, 128, 512, 2048} (default) times
``qmatmul(x[M, 3584] fp16, W[18944, 3584])`` (Qwen2.5-7B's ffn_gate) with
CUDA events (median), and reports:

* GB/s against the bytes the kernel must read/write once (weight blocks + x + y);
* TFLOP/s (2*M*N*K / t);
* cuBLAS fp16 on the dequantized weight at the same M, for scale (not invariant);
* correctness: rel. error vs a dequantize + fp32 matmul reference (< 2e-3), and
  batch invariance: the first M rows bitwise equal the same rows at the largest M.

Prints a compact table, writes ``$OUT/bench_qmatmul.json`` when ``OUT`` is set,
exits 1 on any mismatch. Random blocks with small finite scales (speed does not
depend on the values).

    python benchmarks/bench_qmatmul.py                 # all types, ~2 min on an H200
    python benchmarks/bench_qmatmul.py --types Q4_K Q6_K --ms 1 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from worker_orcd.engine.dequant import dequantize  # noqa: E402
from worker_orcd.engine.kernels.qmatmul import qmatmul  # noqa: E402
from worker_orcd.engine.qweight import FUSED_TYPES, QWeight, row_bytes  # noqa: E402
from worker_orcd.gguf.constants import BLOCK_LAYOUT, GGMLType  # noqa: E402

# byte offsets of the f16 scale fields in one block (ggml block structs)
F16_FIELDS = {
    GGMLType.Q8_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
}  # fmt: skip
FLOATS = {GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16, GGMLType.F32: torch.float32}


def random_weight(t: GGMLType, n: int, k: int, gen: torch.Generator) -> QWeight:
    dev = gen.device
    if t in FLOATS:
        w = (torch.randn(n, k, generator=gen, device=dev) * 0.05).to(FLOATS[t])
        return QWeight(w.view(-1).view(torch.uint8), t, n, k)
    layout = BLOCK_LAYOUT[t]
    nb = n * k // layout.block_size
    blocks = torch.randint(0, 256, (nb, layout.type_size), dtype=torch.uint8, device=dev, generator=gen)
    for off in F16_FIELDS[t]:
        scale = (torch.rand(nb, generator=gen, device=dev) * 0.004 + 0.0005).to(torch.float16)
        blocks[:, off : off + 2] = scale.view(torch.uint8).view(nb, 2)
    return QWeight(blocks.view(-1), t, n, k)


def time_ms(fn, iters: int) -> float:  # noqa: ANN001
    fn()
    if not torch.cuda.is_available():  # smoke run in the interpreter (TRITON_INTERPRET=1)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b))
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", default=[t.name for t in sorted(FUSED_TYPES)])
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 8, 32, 64, 128, 512, 2048])
    ap.add_argument("--n", type=int, default=18944)
    ap.add_argument("--k", type=int, default=3584)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=args.device).manual_seed(0)
    n, k, ms = args.n, args.k, sorted(args.ms)
    x_all = torch.randn(ms[-1], k, generator=gen, device=args.device).to(torch.float16)
    rows, failures = [], []
    print(f"qmatmul W[{n}, {k}], x fp16; GB/s vs bytes read once; cuBLAS fp16 on the dequantized weight for scale")
    print(f"{'type':6} {'M':>5} {'ms':>8} {'GB/s':>7} {'TFLOP/s':>8} {'cublas ms':>9} {'rel err':>9}  ok")
    for name in args.types:
        t = GGMLType[name]
        w = random_weight(t, n, k, gen)
        w16 = dequantize(w.raw, t, n * k, torch.float16).view(n, k)
        full = qmatmul(x_all, w)
        for m in ms:
            x = x_all[:m]
            y = qmatmul(x, w)
            ref = x.float() @ w16.float().t()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            invariant = torch.equal(y, full[:m])
            ok = err < 2e-3 and invariant
            if not ok:
                failures.append(f"{name} M={m}: rel err {err:.2e}, batch invariant {invariant}")
            t_ms = time_ms(lambda: qmatmul(x, w), args.iters)
            t_cublas = time_ms(lambda: torch.nn.functional.linear(x, w16), args.iters)
            nbytes = n * row_bytes(t, k) + m * k * 2 + m * n * 2
            row = {
                "type": name, "M": m, "ms": t_ms, "gb_s": nbytes / t_ms / 1e6,
                "tflop_s": 2 * m * n * k / t_ms / 1e9, "cublas_ms": t_cublas, "rel_err": err, "ok": ok,
            }  # fmt: skip
            rows.append(row)
            print(
                f"{name:6} {m:5d} {t_ms:8.3f} {row['gb_s']:7.0f} {row['tflop_s']:8.1f} {t_cublas:9.3f} "
                f"{err:9.2e}  {'ok' if ok else 'MISMATCH'}",
                flush=True,
            )
        del w, w16, full
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_qmatmul.json").write_text(json.dumps(rows, indent=1))
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
