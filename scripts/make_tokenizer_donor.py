"""Write a header-only GGUF holding a real model's tokenizer (`tokenizer.*` metadata, no tensors).

The GPU machine cannot receive the real models (64 MiB per call), but their
tokenizer metadata is ~6 MB: benchmarks/bench_serve.py and the end-to-end
tests there copy it into synthetic real-shape models so the daemon can serve
them. Usage:

    python scripts/make_tokenizer_donor.py ~/.cache/worker-orcd-models/qwen2.5-coder-0.5b-instruct.gguf \\
        .devdata/qwen05-tokenizer.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker_orcd.gguf import parse_file  # noqa: E402
from worker_orcd.gguf.writer import GGUFWriter  # noqa: E402


def make_donor(model: Path, out: Path) -> Path:
    g = parse_file(model)
    keys = [k for k in g.metadata if k.startswith("tokenizer.")]
    if not keys:
        raise SystemExit(f"{model} has no tokenizer.* metadata")
    w = GGUFWriter()
    w.add("general.architecture", g.architecture or "unknown")
    for k in keys:
        w.add(k, g.metadata[k], g.value_types[k], g.array_types.get(k))
    out.parent.mkdir(parents=True, exist_ok=True)
    return w.write(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    print(make_donor(args.model, args.out))


if __name__ == "__main__":
    main()
