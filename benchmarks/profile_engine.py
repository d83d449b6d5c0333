"""Where does GPU time go? torch.profiler over one pp512 prefill and 32 decode steps.

    python benchmarks/profile_engine.py --shape qwen2.5-0.5b --type F16

Prints the top CUDA kernels by total device time for each phase, plus the
load-phase split (validate vs upload). A diagnosis tool, not a benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from synth import write_synthetic_model  # noqa: E402

from worker_orcd.engine.api import Engine  # noqa: E402
from worker_orcd.loader import LoadOptions, validate_model  # noqa: E402
from worker_orcd.residency import load_resident  # noqa: E402


def top(prof: torch.profiler.profile, n: int = 14) -> str:
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--type", default="F16")
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    path = Path("/tmp") / f"prof-{args.shape}-{args.type}.gguf"
    if not path.exists():
        write_synthetic_model(path, args.shape, args.type)  # type: ignore[arg-type]
    engine = Engine.open("cuda", 0)
    t = time.perf_counter()
    vm = validate_model(str(path), LoadOptions(model_root=path.parent))
    tv = time.perf_counter() - t
    rm = load_resident(engine, vm, kv_cache_mb=1024)
    print(f"validate {tv:.2f} s, load total {time.perf_counter() - t:.2f} s, stats {rm.load_stats}")
    gen = rm._gen
    ids = torch.arange(args.tokens, device="cuda") % rm.config.vocab_size
    with torch.no_grad():
        for _ in range(2):
            gen.prefill(ids)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            gen.prefill(ids)
            torch.cuda.synchronize()
        print(f"== prefill {args.tokens} tokens ==")
        print(top(prof))
        s = time.perf_counter()
        gen.prefill(ids)
        torch.cuda.synchronize()
        print(f"prefill wall {1e3 * (time.perf_counter() - s):.2f} ms")
    rm.close()
    engine.close()


if __name__ == "__main__":
    main()
