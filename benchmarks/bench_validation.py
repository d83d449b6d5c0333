"""Model-validation cost: streamed SHA-256 throughput and GGUF header-parse time.

Usage: python benchmarks/bench_validation.py [MODEL.gguf ...] [--repeat N]
Defaults to the real models in the model cache. Reads the file once to warm the
page cache, then reports the median of N runs (page-cache-hot numbers: they
measure our code, not the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from worker_orcd.gguf import parse_file
from worker_orcd.integrity import sha256_stream

CACHE = Path(os.environ.get("WORKER_ORCD_MODEL_CACHE", Path.home() / ".cache" / "worker-orcd-models"))
DEFAULT_MODELS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "gemma3-270m"]


def bench(path: Path, repeat: int) -> dict[str, float | int | str]:
    size = path.stat().st_size
    with open(path, "rb") as fh:  # warm the page cache
        while fh.read(64 << 20):
            pass
    hash_s, parse_s = [], []
    for _ in range(repeat):
        with open(path, "rb") as fh:
            t = time.perf_counter()
            sha256_stream(fh)
            hash_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        g = parse_file(path)
        parse_s.append(time.perf_counter() - t)
    h, p = statistics.median(hash_s), statistics.median(parse_s)
    return {
        "model": path.name,
        "bytes": size,
        "sha256_MBps": size / h / 1e6,
        "sha256_s": h,
        "parse_ms": p * 1e3,
        "header_bytes": g.header_size,
        "tensors": len(g.tensors),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write results here")
    args = ap.parse_args()
    paths = args.models or [CACHE / f"{m}.gguf" for m in DEFAULT_MODELS]
    rows = [bench(p, args.repeat) for p in paths if p.exists()]
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print("| model | size (MB) | SHA-256 (MB/s) | header parse (ms) | header bytes | tensors |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bytes'] / 1e6:.0f} | {r['sha256_MBps']:.0f} | {r['parse_ms']:.1f} | {r['header_bytes']} | {r['tensors']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
