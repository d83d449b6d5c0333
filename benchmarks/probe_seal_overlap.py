"""A seal check beside the engine's steps: what it costs them, per program count of the fingerprint.

The engine loop starts a seal check on the fingerprint's side stream and keeps stepping
(batching/loop.py). Here, on a loaded model: the fingerprint alone (``Fingerprint.start(G)``,
G programs or one per tile), a decode step (B = --batch, graph) and a mixed step (B - 1
decode rows + a --chunk-token prompt chunk, graph) alone, then each step replayed back to back
while one fingerprint runs beside it: the steps' mean time during the check, how many ran, and
the check's own time. Prints a table; JSON to $OUT/probe_seal_overlap.json.

    python benchmarks/probe_seal_overlap.py --model /tmp/models/qwen2.5-7b-Q4_K_M.gguf --programs 0 8 16 32
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

from worker_orcd.batching.step import SampleSpec, StepBatch, StepRow  # noqa: E402
from worker_orcd.engine.api import Engine, SamplingParams  # noqa: E402
from worker_orcd.loader import LoadOptions, validate_model  # noqa: E402
from worker_orcd.residency import load_resident  # noqa: E402


def alone_ms(fn, n: int = 20) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def beside(step, fp, programs: int | None) -> dict[str, float]:  # noqa: ANN001
    """Steps back to back while one fingerprint runs: their mean ms, their count, the check's ms."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pending = fp.start(programs)
    times = []
    while not pending.ready():
        t = time.perf_counter()
        step()
        torch.cuda.current_stream().synchronize()  # not the device: the check runs on its own stream
        times.append((time.perf_counter() - t) * 1e3)
    pending()
    check_ms = (time.perf_counter() - t0) * 1e3
    return {"steps": len(times), "step_ms": statistics.mean(times) if times else float("nan"),
            "step_max_ms": max(times) if times else float("nan"), "check_ms": check_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=192)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--programs", nargs="+", type=int, default=[0, 8, 16, 32, 64], help="0: one program per tile")
    ap.add_argument("--resident-weights", choices=("dense", "quantized", "quantized-half2"), default="dense")
    args = ap.parse_args()
    engine = Engine.open("cuda", 0, resident_weights=args.resident_weights)
    rm = load_resident(engine, validate_model(str(args.model), LoadOptions(model_root=args.model.parent)),
                       max_batch=args.batch)
    runner, fp = rm.runner, rm._fingerprint
    bs = runner.block_size
    per_row = -(-(args.context + 1) // bs)
    rows = tuple(StepRow(i, (7,), args.context, tuple(range(i * per_row, (i + 1) * per_row)),
                         SampleSpec(SamplingParams(max_tokens=1), 0)) for i in range(args.batch))
    last = rows[-1]
    steps = {
        "decode": StepBatch(rows),
        "mixed": StepBatch(rows[:-1] + (StepRow(last.seq_id, (7,) * args.chunk, 0, last.block_table, last.sample),)),
    }
    out = {"model": args.model.name, "resident_gb": fp.plan.n_bytes / 1e9 if fp.plan else None, "rows": []}
    for name, batch in steps.items():
        out[f"{name}_alone_ms"] = alone_ms(lambda b=batch: runner.step(b))
    for g in args.programs:
        programs = g or None
        check_alone = alone_ms(lambda p=programs: fp.start(p)(), 5)
        row = {"programs": g or "per tile", "check_alone_ms": check_alone}
        for name, batch in steps.items():
            beside(lambda b=batch: runner.step(b), fp, programs)  # warm
            r = beside(lambda b=batch: runner.step(b), fp, programs)
            row.update({f"{name}_{k}": v for k, v in r.items()})
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{out['model']}: {out['resident_gb']:.2f} GB resident; decode step alone {out['decode_alone_ms']:.2f} ms, "
          f"mixed step alone {out['mixed_alone_ms']:.2f} ms (B = {args.batch}, chunk {args.chunk})")
    print("| programs | check alone ms | decode steps beside: n, mean / max ms, check ms | mixed steps beside: n, mean / max ms, check ms |")
    print("|---|---:|---|---|")
    for r in out["rows"]:
        print(f"| {r['programs']} | {r['check_alone_ms']:.2f} | {r['decode_steps']}, {r['decode_step_ms']:.2f} / "
              f"{r['decode_step_max_ms']:.2f}, {r['decode_check_ms']:.1f} | {r['mixed_steps']}, {r['mixed_step_ms']:.2f} / "
              f"{r['mixed_step_max_ms']:.2f}, {r['mixed_check_ms']:.1f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_seal_overlap.json").write_text(json.dumps(out, indent=1))
    rm.close()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
