"""Continuous-batching throughput of the engine (no HTTP): closed loop of N clients per model.

Each client sends jobs back to back: a prompt of a seeded random length in
[--prompt-min, --prompt-max] random token ids, --out-min..--out-max output
tokens (greedy, no stop ids: EOS ignored), until --jobs-per-client jobs are
done. Reported per (model, concurrency): aggregate output tok/s over the
measured window, TTFT p50/p99 (submit -> first token), inter-token latency
p50/p99 (consecutive token arrivals in the client), mean batch rows per step.
Concurrency 1 is the single-stream baseline. Prints a markdown table; writes
``$OUT/bench_batch.json`` when OUT is set.

    python benchmarks/bench_batch.py --shapes qwen2.5-0.5b --types F16 --concurrency 1 8 32 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from synth import write_synthetic_model  # noqa: E402

from worker_orcd.engine.api import Engine, GenerationEnd, ResidentModel, SamplingParams, TokenEvent  # noqa: E402
from worker_orcd.loader import LoadOptions, validate_model  # noqa: E402
from worker_orcd.residency import load_sealed  # noqa: E402
from worker_orcd.seal import Sealer  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_clients(rm: ResidentModel, n: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    vocab = rm.config.vocab_size
    rng = random.Random(seed)
    plans = [
        [
            ([rng.randrange(vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))],
             rng.randint(args.out_min, args.out_max))
            for _ in range(args.jobs_per_client)
        ]
        for _ in range(n)
    ]
    ttft: list[float] = []
    itl: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    start = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def client(jobs: list[tuple[list[int], int]]) -> None:
        try:
            start.wait()
            for ids, out in jobs:
                t0 = time.perf_counter()
                last = None
                got = 0
                my_itl = []
                for ev in rm.generate(ids, SamplingParams(max_tokens=out)):
                    if isinstance(ev, TokenEvent):
                        now = time.perf_counter()
                        if last is None:
                            first = now - t0
                        else:
                            my_itl.append(now - last)
                        last = now
                        got += 1
                    elif isinstance(ev, GenerationEnd) and ev.tokens_out != out:
                        raise RuntimeError(f"job ended early: {ev}")
                with lock:
                    ttft.append(first)
                    itl.extend(my_itl)
                    tokens[0] += got
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {
        "concurrency": n,
        "tok_s": tokens[0] / wall,
        "tokens": tokens[0],
        "wall_s": wall,
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3,
        "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
        "itl_p50_ms": pct(itl, 0.5) * 1e3,
        "itl_p99_ms": pct(itl, 0.99) * 1e3,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b"])
    ap.add_argument("--types", nargs="+", default=["F16"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--out-min", type=int, default=128)
    ap.add_argument("--out-max", type=int, default=256)
    ap.add_argument("--jobs-per-client", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--kv-cache-mb", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/bench-batch")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    engine = Engine.open("cuda", 0)
    rows: list[dict[str, Any]] = []
    for shape in args.shapes:
        for wtype in args.types:
            path = work / f"{shape}-{wtype}.gguf"
            if not path.exists():
                write_synthetic_model(path, shape, wtype)  # type: ignore[arg-type]
            vm = validate_model(str(path), LoadOptions(model_root=path.parent))
            t0 = time.perf_counter()
            rm = load_sealed(engine, vm, shard_id="bench", sealer=Sealer(), kv_cache_mb=args.kv_cache_mb,
                             max_batch=args.max_batch or max(args.concurrency), prefill_chunk=args.prefill_chunk).resident
            ready = time.perf_counter() - t0
            print(f"# {shape} {wtype}: ready in {ready:.1f} s, batch {rm.max_batch}, graphs {sorted(rm.runner.graphs)}",
                  flush=True)
            try:
                run_clients(rm, 1, argparse.Namespace(**{**vars(args), "jobs_per_client": 1, "out_min": 16,
                                                        "out_max": 16}), 0)  # warm-up
                for n in args.concurrency:
                    r = run_clients(rm, n, args, seed=n)
                    r.update(shape=shape, type=wtype, preemptions=rm.stats()["preemptions"])
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            finally:
                rm.close()
            torch.cuda.empty_cache()
    print("\n| model | type | clients | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['type']} | {r['concurrency']} | {r['tok_s']:,.0f} | "
              f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_batch.json").write_text(json.dumps(rows, indent=1))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
