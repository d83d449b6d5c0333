"""The engine alone under bench_load's load: is a long inter-token gap the engine's or the server's?

Same closed loop as ``bench_load.py`` (N clients, prompts of a seeded random length in
[--prompt-min, --prompt-max] token ids, --out-min..--out-max output tokens, greedy, EOS
never drawn: no stop ids) but no HTTP: each job's events go to a sink on the engine thread
(``generate_into``), which records the time and, at a job's end, submits that client's next job.
Nothing else holds the GIL, so the gaps measured here are the engine's own (GPU steps and the
engine thread's host work); what ``bench_load.py`` sees above them is the server's share.
Also reports the gaps between consecutive steps' hand-outs (``LoopObserver.step``'s
``interval_ms``, the ``worker_step_interval_ms`` histogram's input). Seal checks run as served
(``load_sealed``'s hook, the serve path's ``before_admit``).

    python benchmarks/bench_engine_load.py --model /tmp/models/qwen2.5-7b-Q4_K_M.gguf --concurrency 1 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_timeline  # noqa: E402

from worker_orcd.engine import api  # noqa: E402
from worker_orcd.engine.api import Engine, GenerationEnd, SamplingParams, TokenEvent  # noqa: E402
from worker_orcd.loader import LoadOptions, validate_model  # noqa: E402
from worker_orcd.residency import load_sealed  # noqa: E402
from worker_orcd.seal import Sealer  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Gaps:
    """LoopObserver: the engine-side step gaps inside the measured window."""

    def __init__(self) -> None:
        self.window = (float("inf"), float("inf"))
        self.gaps: list[float] = []
        self.steps = 0
        self.rows = 0
        self.total_steps = 0  # every step, in or out of the window (the trace's step count)

    def step(self, rows: int, tokens: int, running: int, waiting: int, blocks_used: int, blocks_total: int,
             interval_ms: float | None = None) -> None:
        self.total_steps += 1
        if self.window[0] <= time.perf_counter() <= self.window[1]:
            self.steps += 1
            self.rows += rows
            if interval_ms is not None:
                self.gaps.append(interval_ms)

    def admitted(self, queue_ms: float) -> None:
        pass

    def preempted(self) -> None:
        pass


def run_level(rm: Any, n: int, args: argparse.Namespace, gaps: Gaps, vocab: int,
              trace_s: float = 0.0) -> dict[str, Any]:
    """One level's closed loop; with ``trace_s``, a shorter run whose device activity is traced for
    ``trace_s`` seconds after the warm-up (its own numbers carry the tracer's overhead)."""
    rng = random.Random(n)
    t0 = time.perf_counter()
    duration = args.warmup + trace_s + 1.0 if trace_s else args.duration
    window = (t0 + args.warmup, t0 + duration)
    gaps.window, gaps.gaps, gaps.steps, gaps.rows = window, [], 0, 0
    lock = threading.Lock()
    itl: list[float] = []
    ttft: list[float] = []
    count = [0]
    done = threading.Event()
    live = [n]
    errors: list[BaseException] = []

    def start_job() -> None:
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
        out = rng.randint(args.out_min, args.out_max)
        t_sub = time.perf_counter()
        last = [None]

        def sink(ev: Any) -> None:
            now = time.perf_counter()
            if isinstance(ev, TokenEvent):
                inside = window[0] <= now <= window[1]
                with lock:
                    if inside:
                        count[0] += 1
                        if last[0] is None:
                            ttft.append(now - t_sub)
                        else:
                            itl.append(now - last[0])
                last[0] = now
                return
            if not isinstance(ev, GenerationEnd):
                errors.append(ev if isinstance(ev, BaseException) else RuntimeError(repr(ev)))
            if now < window[1] and not errors:
                start_job()
                return
            with lock:
                live[0] -= 1
                if live[0] == 0:
                    done.set()

        rm.generate_into(ids, SamplingParams(max_tokens=out), None, sink)

    for _ in range(n):
        start_job()
    timeline = None
    if trace_s:
        time.sleep(max(0.0, window[0] + 0.2 - time.perf_counter()))
        s0 = gaps.total_steps
        trace = gpu_timeline.traced(trace_s)
        timeline = gpu_timeline.summary(trace, gaps.total_steps - s0)
    done.wait(duration + 120)
    if errors:
        raise errors[0]
    span = window[1] - window[0]
    return {
        "clients": n, "tok_s": count[0] / span,
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3, "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
        "itl_p50_ms": pct(itl, 0.5) * 1e3, "itl_p99_ms": pct(itl, 0.99) * 1e3,
        "step_gap_p50_ms": pct(gaps.gaps, 0.5), "step_gap_p99_ms": pct(gaps.gaps, 0.99),
        "steps": gaps.steps, "rows_per_step": gaps.rows / gaps.steps if gaps.steps else None,
        **({"timeline": timeline} if timeline is not None else {}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--duration", type=float, default=12.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--out-min", type=int, default=128)
    ap.add_argument("--out-max", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--mixed-step-tokens", type=int, default=None)
    ap.add_argument("--resident-weights", choices=("dense", "quantized", "quantized-half2"), default="dense")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run only")
    ap.add_argument("--variants", nargs="+", default=["0:0"],
                    help="INTERVAL_MS:PROGRAMS[:CAP] per run of the levels: the loop's seal-check interval, the "
                         "fingerprint's programs (0: one per tile) and the mixed-step token cap (absent or 0: as "
                         "loaded), set on the loaded model between runs")
    ap.add_argument("--trace-s", type=float, default=0.0,
                    help="after each level, a traced run: the device timeline for this many seconds (gpu_timeline.py)")
    args = ap.parse_args()
    engine = Engine.open(args.device, 0, resident_weights=args.resident_weights)
    vm = validate_model(str(args.model), LoadOptions(model_root=args.model.parent))
    gaps = Gaps()
    holder: dict[str, Any] = {}

    def before_admit(n: int, *, beside_steps: bool) -> Any:
        return holder["sealed"].verify_seal_start(beside_steps=beside_steps)

    t0 = time.perf_counter()
    sealed = load_sealed(engine, vm, shard_id="bench", sealer=Sealer(), max_batch=args.max_batch or max(args.concurrency),
                         mixed_step_tokens=args.mixed_step_tokens, before_admit=before_admit, observer=gaps)
    holder["sealed"] = sealed
    rm = sealed.resident
    print(f"# {args.model.name}: ready in {time.perf_counter() - t0:.1f} s, batch {rm.max_batch}, load stages (s) "
          f"{ {k: round(v, 2) for k, v in rm.load_stages.items()} }", flush=True)
    rows: list[dict[str, Any]] = []
    traces: list[dict[str, Any]] = []
    loaded_cap = rm._loop.scheduler.mixed_budget  # noqa: SLF001
    try:
        for variant in args.variants:
            interval_ms, programs, cap = ([float(x) for x in variant.split(":")] + [0.0])[:3]
            rm._loop._check_interval = interval_ms / 1e3  # noqa: SLF001 - a benchmark's knob
            api.SEAL_CHECK_PROGRAMS = int(programs) or None
            sched = rm._loop.scheduler  # noqa: SLF001
            sched.mixed_budget = int(cap) if cap else loaded_cap
            for n in args.concurrency:
                r = run_level(rm, n, args, gaps, rm.config.vocab_size)
                r.update(seal_interval_ms=interval_ms, seal_programs=int(programs) or "per tile",
                         mixed_cap=sched.mixed_budget)
                rows.append(r)
                print(json.dumps(r), flush=True)
                if args.trace_s:
                    t = run_level(rm, n, args, gaps, rm.config.vocab_size, trace_s=args.trace_s)
                    gpu_timeline.print_summary(f"{n} clients, cap {sched.mixed_budget}, traced run "
                                               f"({t['tok_s']:,.0f} tok/s, ITL p50 {t['itl_p50_ms']:.2f} ms)", t["timeline"])
                    traces.append({"clients": n, "mixed_cap": sched.mixed_budget, **t})
    finally:
        sealed.close()
        engine.close()
    print("\n| seal interval ms | check programs | mixed cap | clients | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
          "| step gap p50 / p99 ms | steps | rows/step |")
    print("|---:|---|---:|---:|---:|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['seal_interval_ms']:g} | {r['seal_programs']} | {r['mixed_cap']} | {r['clients']} | {r['tok_s']:,.0f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['step_gap_p50_ms']:.1f} / {r['step_gap_p99_ms']:.1f} | "
              f"{r['steps']} | {r['rows_per_step'] or 0:.1f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"bench_engine_load_{args.model.stem}.json").write_text(
            json.dumps({"rows": rows, "traces": traces}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
