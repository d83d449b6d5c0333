"""SPEC 5000: record the determinism suite's token streams on one GPU, compare them with another's.

    python benchmarks/determinism_streams.py record tests/fixtures/determinism_streams.json   # GPU machine 1
    python benchmarks/determinism_streams.py compare tests/fixtures/determinism_streams.json  # GPU machine 2
    python benchmarks/determinism_streams.py diff a.json b.json                                # two recordings

Jobs: synthetic models of real layer geometry (``synth.py`` mid-qwen2 / mid-llama /
mid-gemma3: deterministic files, so every machine writes the same bytes, checked
by digest) and the real models where they are in the model cache, each with the
determinism suite's greedy and seeded cases on two prompts. A recording carries
the GPU name, driver, CUDA, torch and Triton versions, the commit and every
model's digest; ``compare`` runs the jobs here and reports each divergence by job
and token index (exit 1 if any). ``tests/test_determinism_across_gpus.py`` does
the same under pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth import write_synthetic_model  # noqa: E402

from worker_orcd.engine.events import GenerationEnd, SamplingParams, TokenEvent  # noqa: E402
from worker_orcd.loader import LoadOptions, validate_model  # noqa: E402
from worker_orcd.residency import load_resident  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYNTH_MODELS = {"mid-qwen2": "Q8_0", "mid-llama": "Q8_0", "mid-gemma3": "Q4_K_M"}
REAL_MODELS = ("qwen2.5-coder-0.5b-instruct", "gemma3-270m")
CASES = {  # the determinism suite's cases (tests/test_determinism_bundle.py)
    "greedy": SamplingParams(max_tokens=32),
    "greedy-penalty": SamplingParams(max_tokens=32, repetition_penalty=2.0),
    "sampled": SamplingParams(max_tokens=32, temperature=0.8, top_k=40, top_p=0.95, seed=1234567890123),
    "sampled-penalty": SamplingParams(max_tokens=32, temperature=1.2, min_p=0.02, repetition_penalty=1.3, seed=2**64 - 1),
}


def prompts(vocab: int) -> dict[str, list[int]]:
    return {"p8": [(i * 7919 + 17) % vocab for i in range(8)], "p300": [(i * 104729 + 3) % vocab for i in range(300)]}


def environment(device: str) -> dict[str, Any]:
    import torch
    import triton

    env: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }  # fmt: skip
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]
            env["driver"] = subprocess.run(smi, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown"
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown"
    return env


def _model_files(workdir: Path, models: list[str]) -> list[tuple[str, Path]]:
    cache = Path(os.environ.get("WORKER_ORCD_MODEL_CACHE", Path.home() / ".cache" / "worker-orcd-models"))
    out = []
    for name in models:
        if name in SYNTH_MODELS:
            path = workdir / f"{name}-{SYNTH_MODELS[name]}.gguf"
            if not path.exists():
                write_synthetic_model(path, name, SYNTH_MODELS[name])  # type: ignore[arg-type]
            out.append((name, path))
        elif (cache / f"{name}.gguf").exists():
            out.append((name, cache / f"{name}.gguf"))
    return out


def run_jobs(device: str, workdir: Path, models: list[str], max_tokens: int | None = None) -> dict[str, Any]:
    """Every (model, case, prompt) job's tokens; each model loaded once, each job run once."""
    from worker_orcd.engine.api import Engine

    workdir.mkdir(parents=True, exist_ok=True)
    engine = Engine.open(device, 0)  # type: ignore[arg-type]
    jobs: dict[str, Any] = {}
    digests: dict[str, str] = {}
    try:
        for name, path in _model_files(workdir, models):
            vm = validate_model(str(path), LoadOptions(model_root=path.parent))
            digests[name] = vm.digest
            rm = load_resident(engine, vm, kv_cache_mb=256)
            try:
                for case, params in CASES.items():
                    if max_tokens is not None:
                        params = SamplingParams(**{**asdict(params), "max_tokens": max_tokens})
                    for pname, prompt in prompts(rm.config.vocab_size).items():
                        tokens: list[int] = []
                        end = None
                        for ev in rm.generate(prompt, params):
                            if isinstance(ev, TokenEvent):
                                tokens.append(ev.token_id)
                            elif isinstance(ev, GenerationEnd):
                                end = ev
                        assert end is not None
                        params_json = {k: (sorted(v) if isinstance(v, frozenset) else v)
                                       for k, v in asdict(params).items() if k != "constraint"}  # fmt: skip
                        jobs[f"{name}/{case}/{pname}"] = {"model": name, "params": params_json, "prompt_len": len(prompt),
                                                          "tokens": tokens, "stop_reason": end.stop_reason}  # fmt: skip
            finally:
                rm.close()
    finally:
        engine.close()
    return {"env": environment(device), "digests": digests, "jobs": jobs}


def divergences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """One line per job that differs: where (token index) and what; also digest and job-set changes."""
    out = []
    for name in sorted(set(a["digests"]) & set(b["digests"])):
        if a["digests"][name] != b["digests"][name]:
            out.append(f"{name}: model digest {a['digests'][name][:12]}… vs {b['digests'][name][:12]}… (not the same file)")
    for job in sorted(set(a["jobs"]) ^ set(b["jobs"])):
        out.append(f"{job}: only in {'the first' if job in a['jobs'] else 'the second'} recording")
    for job in sorted(set(a["jobs"]) & set(b["jobs"])):
        ta, tb = a["jobs"][job]["tokens"], b["jobs"][job]["tokens"]
        if ta != tb:
            i = next((k for k, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            x = ta[i] if i < len(ta) else "end"
            y = tb[i] if i < len(tb) else "end"
            out.append(f"{job}: diverges at token {i}: {x} vs {y} ({len(ta)} vs {len(tb)} tokens)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["record", "compare", "diff"])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default=",".join([*SYNTH_MODELS, *REAL_MODELS]))
    ap.add_argument("--max-tokens", type=int, default=None, help="override (a quick CPU check)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/worker-orcd-determinism"))
    args = ap.parse_args()
    if args.action == "diff":
        a, b = (json.loads(p.read_text()) for p in args.paths[:2])
    else:
        b = run_jobs(args.device, args.workdir, args.models.split(","), args.max_tokens)
        if args.action == "record":
            args.paths[0].parent.mkdir(parents=True, exist_ok=True)
            args.paths[0].write_text(json.dumps(b, indent=1) + "\n")
            print(f"recorded {len(b['jobs'])} jobs on {b['env'].get('gpu', args.device)} -> {args.paths[0]}")
            return 0
        a = json.loads(args.paths[0].read_text())
    print(f"A: {json.dumps(a['env'])}\nB: {json.dumps(b['env'])}")
    diffs = divergences(a, b)
    print("\n".join(diffs) if diffs else f"all {len(set(a['jobs']) & set(b['jobs']))} shared jobs identical")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
