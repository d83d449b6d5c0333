"""Python's cyclic GC after a model load (CPU dev mode, no GPU): objects tracked, one full
collection's time, and the same after ``serve.settle_heap()`` (what the daemon does after a load).

    python benchmarks/bench_gc.py [--model ~/.cache/worker-orcd-models/qwen2.5-coder-0.5b-instruct.gguf]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastapi  # noqa: E402,F401 - the server's imports are part of the heap too
import uvicorn  # noqa: E402,F401

from worker_orcd.engine.api import Engine  # noqa: E402
from worker_orcd.loader import LoadOptions, validate_model  # noqa: E402
from worker_orcd.residency import load_resident  # noqa: E402
from worker_orcd.serve import settle_heap  # noqa: E402


def full_collect_ms() -> float:
    t = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path,
                    default=Path.home() / ".cache/worker-orcd-models/qwen2.5-coder-0.5b-instruct.gguf")
    args = ap.parse_args()
    engine = Engine.open("cpu")
    rm = load_resident(engine, validate_model(str(args.model), LoadOptions(model_root=args.model.parent)),
                       kv_cache_mb=64)
    print(f"objects tracked after the load: {len(gc.get_objects()):,}")
    print("full collection ms:", ", ".join(f"{full_collect_ms():.1f}" for _ in range(3)))
    settle_heap()
    print(f"after settle_heap (frozen {gc.get_freeze_count():,}): full collection ms:",
          ", ".join(f"{full_collect_ms():.3f}" for _ in range(3)))
    gc.unfreeze()
    rm.close()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
