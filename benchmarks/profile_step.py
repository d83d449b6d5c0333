"""Where a decode step's time goes: graph replay (GPU) vs the runner's host work vs the engine loop.

For batch sizes B: a pure-decode StepBatch of B rows at context ~C is timed
as (a) the captured graph's replay alone, (b) ``runner.step`` (inputs, replay,
sampling, the host read), (c) the engine loop end to end (one job per row,
tokens/s per row); and one eager step under the torch profiler lists the
kernels by device time. Prints a short table; JSON to $OUT/profile_step.json.

    python benchmarks/profile_step.py --shape qwen2.5-0.5b --type F16 --batch 1 16 64
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from synth import write_synthetic_model  # noqa: E402

from worker_orcd.batching.step import PENDING, SampleSpec, StepBatch, StepRow  # noqa: E402
from worker_orcd.engine.api import Engine, SamplingParams  # noqa: E402
from worker_orcd.loader import LoadOptions, validate_model  # noqa: E402
from worker_orcd.residency import load_resident  # noqa: E402


def med_ms(fn, n: int = 30) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--type", default="F16")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--model", type=Path, default=None, help="an existing GGUF instead of a synthesized one")
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the lone prompt-chunk step timed once")
    ap.add_argument("--mixed-chunk", type=int, default=200, help="prompt tokens in the mixed step (in place of the last decode row)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cprofile", action="store_true", help="Python profile of 300 runner.step calls at the first B")
    ap.add_argument("--resident-weights", choices=("dense", "quantized", "quantized-half2"), default="dense")
    ap.add_argument("--pdl", choices=("off", "on", "prefetch"), default=None,
                    help="programmatic dependent launch of the step's kernels (kernels/pdl.py): off, on without or with "
                         "the weight prefetch (default: on without it, where supported)")
    ap.add_argument("--mixed-parts", choices=("on", "off"), default=None,
                    help="a group's third part of another type (Q4_K_M's v) in the same launch as the first two (on) or "
                         "its own (off): A/B of kernels/fragments.MIXED_PARTS")
    ap.add_argument("--frag-stages", choices=("shape", "3"), default=None,
                    help="decode fragment-order launches' pipeline depth per type and K segment (fragments.swap_stages) "
                         "or 3 everywhere: A/B of fragments.STAGES_BY_SHAPE")
    ap.add_argument("--fuse-sum", choices=("on", "off"), default=None,
                    help="decode fragment-order launches add their K segments themselves up to 16 rows (on) or leave "
                         "it to a second launch (off): A/B of fragments.FUSE_MAX_M (16 / 0)")
    ap.add_argument("--dot-k", type=int, choices=(32, 64), default=None,
                    help="inputs per tensor-core dot in the fragment-order Q4_K chain (fragments.DOT_K): 32 (two dots per "
                         "64-input chunk) or 64 (one)")
    ap.add_argument("--min-br", type=int, choices=(8, 16), default=None,
                    help="tokens per fragment-order decode program up to 8 rows (fragments.MIN_BR): 8 or 16")
    ap.add_argument("--seg-flat", choices=("on", "off"), default=None,
                    help="the quantized prefill's segmented chains in one loop or one per segment (A/B of matmul_dense.SEG_FLAT)")
    args = ap.parse_args()
    path = args.model or Path("/tmp/profile-step") / f"{args.shape}-{args.type}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        write_synthetic_model(path, args.shape, args.type)  # type: ignore[arg-type]
    if args.pdl is not None:
        from worker_orcd.engine.kernels import pdl
        pdl.ON = args.pdl != "off"
        pdl.PREFETCH = args.pdl == "prefetch"
    if args.mixed_parts is not None:
        from worker_orcd.engine.kernels import fragments
        fragments.MIXED_PARTS = args.mixed_parts == "on"
    if args.frag_stages is not None:
        from worker_orcd.engine.kernels import fragments
        fragments.STAGES_BY_SHAPE = args.frag_stages == "shape"
    if args.fuse_sum is not None:
        from worker_orcd.engine.kernels import fragments
        fragments.FUSE_MAX_M = 16 if args.fuse_sum == "on" else 0
    if args.dot_k is not None:
        from worker_orcd.engine.kernels import fragments
        fragments.DOT_K = args.dot_k
    if args.min_br is not None:
        from worker_orcd.engine.kernels import fragments
        fragments.MIN_BR = args.min_br
    if args.seg_flat is not None:
        from worker_orcd.engine.kernels import matmul_dense
        matmul_dense.SEG_FLAT = args.seg_flat == "on"
    engine = Engine.open("cuda", 0, resident_weights=args.resident_weights)
    rm = load_resident(engine, validate_model(str(path), LoadOptions(model_root=path.parent)), max_batch=max(args.batch))
    runner = rm.runner
    bs = runner.block_size
    per_row = -(-(args.context + 1) // bs)
    rows_out = []
    chunk = args.prefill
    lone = StepBatch((StepRow(0, (7,) * chunk, 0, tuple(range(-(-(chunk + 1) // bs))),
                              SampleSpec(SamplingParams(max_tokens=1), 0)),))
    prefill_ms = med_ms(lambda: runner.step(lone), 10)
    print(json.dumps({"prefill_tokens": chunk, "prefill_ms": prefill_ms,
                      "prefill_tok_s": chunk / prefill_ms * 1e3}), flush=True)
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner.step(lone)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    for b in args.batch:
        rows = tuple(
            StepRow(i, (7,), args.context, tuple(range(i * per_row, (i + 1) * per_row)),
                    SampleSpec(SamplingParams(max_tokens=1), 0))
            for i in range(b)
        )
        batch = StepBatch(rows)
        bucket = min(x for x in runner.graphs if x >= b)
        graph, _ = runner.graphs[bucket]
        replay = med_ms(graph.replay)
        step = med_ms(lambda: runner.step(batch))
        # overlapped as the engine loop runs host-free jobs: step N+1 queued (its tokens PENDING, read on
        # the device) before step N's tokens are read
        pend = StepBatch(tuple(StepRow(r.seq_id, (PENDING,), r.start, r.block_table, r.sample) for r in rows))
        h = runner.launch(batch)
        for i in range(60):  # 10 warm-up steps, then 50 timed
            if i == 10:
                t0 = time.perf_counter()
            nxt = runner.launch(pend)
            h.result()
            h = nxt
        h.result()
        overlapped = (time.perf_counter() - t0) / 50 * 1e3
        eager_rows = StepBatch(rows)
        # a step with a prompt chunk in place of the last decode row (a mixed-step graph)
        last = rows[-1]
        mixed = StepBatch(rows[:-1] + (StepRow(last.seq_id, (7,) * args.mixed_chunk, 0, last.block_table, last.sample),))
        mixed_ms = med_ms(lambda: runner.step(mixed), 10)
        graphs, mixed_graphs = dict(runner.graphs), dict(runner.mixed_graphs)
        runner.graphs.clear()
        runner.mixed_graphs.clear()
        eager = med_ms(lambda: runner.step(eager_rows), 10)
        eager_mixed = med_ms(lambda: runner.step(mixed), 10)
        runner.graphs.update(graphs)
        runner.mixed_graphs.update(mixed_graphs)
        r = {"batch": b, "bucket": bucket, "replay_ms": replay, "step_ms": step, "eager_step_ms": eager,
             "host_ms": step - replay, "overlapped_step_ms": overlapped, "tok_s_at_step": b / step * 1e3, "mixed_step_ms": mixed_ms,
             "eager_mixed_step_ms": eager_mixed}
        rows_out.append(r)
        print(json.dumps(r), flush=True)
        if args.cprofile and b == args.batch[0]:
            import cProfile
            import pstats

            prof_py = cProfile.Profile()
            prof_py.enable()
            for _ in range(300):
                runner.step(batch)
            prof_py.disable()
            pstats.Stats(prof_py).sort_stats("tottime").print_stats(14)
        if args.profile and b in (1, max(args.batch)):
            # the decode graph itself: its kernels' device time against the replay's wall time (the rest: gaps)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    graph.replay()
                torch.cuda.synchronize()
            ev = prof.key_averages()
            busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ev) / 10
            launches = sum(e.count for e in ev) / 10
            print(f"# decode graph B={b} (bucket {bucket}): {launches:.0f} kernels per replay, {busy_us:.0f} us of "
                  f"kernel time per replay of {replay * 1e3:.0f} us ({100 * busy_us / (replay * 1e3):.0f} % busy); "
                  "totals over 10 replays:")
            print(ev.table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))
            runner.graphs.clear()  # and the mixed graphs: else the step replays the smallest of those (64 tokens)
            runner.mixed_graphs.clear()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                runner.step(eager_rows)
                torch.cuda.synchronize()
            runner.graphs.update(graphs)
            runner.mixed_graphs.update(mixed_graphs)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
            runner.mixed_graphs.clear()
            runner.graphs.clear()
            runner.step(mixed)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                runner.step(mixed)
                torch.cuda.synchronize()
            runner.graphs.update(graphs)
            runner.mixed_graphs.update(mixed_graphs)
            print(f"# mixed step, eager: {b - 1} decode rows + a {args.mixed_chunk}-token prompt chunk")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))
    print("\n| B | bucket | graph replay ms | runner.step ms | host ms | overlapped step ms | eager step ms | tok/s | "
          "mixed step ms (graph / eager) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows_out:
        print(f"| {r['batch']} | {r['bucket']} | {r['replay_ms']:.3f} | {r['step_ms']:.3f} | {r['host_ms']:.3f} | "
              f"{r['overlapped_step_ms']:.3f} | "
              f"{r['eager_step_ms']:.3f} | {r['tok_s_at_step']:,.0f} | {r['mixed_step_ms']:.2f} / "
              f"{r['eager_mixed_step_ms']:.2f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "profile_step.json").write_text(json.dumps(rows_out, indent=1))
    rm.close()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
