"""Engine benchmark on the GPU: load, time-to-ready, prefill, decode, TTFT, seal, % of roofline.

For each shape x weight type a synthetic model of the real shape is written
(``benchmarks/synth.py``), validated (hash + parse, as in production), loaded
and sealed, then measured:

* load GB/s: file bytes / (stream + re-hash + on-device dequant) time;
* time to ready: validate + load + graph capture + fingerprint + seal, the one-pass load that
  ``serve`` runs (the upload hashes the file; until the fifteenth session the bench hashed it twice);
* prefill tok/s: a 512-token prompt (pp512) in one step, best of 3, as a request's prompt runs (a
  mixed-step graph: the load captures them up to PREFILL_CHUNK_CUDA = 512 tokens; until the fifteenth
  session the table timed eager launches, kept in the JSON as ``prefill_eager_tok_s``), and TTFT;
* decode tok/s: batch 1, 128 greedy tokens through the CUDA graph;
* seal verify ms: median of 10 ``verify_seal()`` calls;
* % of roofline: (bytes a decode step must read: every weight except the
  unused embedding rows, plus the KV cache in use) / (D2D bandwidth measured
  here as (read + written bytes) / time of a large device-to-device copy),
  divided by the measured time per token.

With ``--llama-bench PATH`` llama.cpp's ``llama-bench`` runs on the same file right
after (``-p 512 -n 128 -fa 1 -ngl 99 -r 3 -o json``; the synthetic model then carries the
real tokenizer, ``--tokenizer-from``, and llama.cpp's embedding rows, ``--vocab``) and the
table gives both engines' pp512 and tg128 and their ratio per row.

Prints a markdown table, writes ``$OUT/bench_engine.json`` when ``OUT`` is
set, exits non-zero on any error.

    python benchmarks/bench_engine.py --shapes qwen2.5-0.5b --types F16
    python benchmarks/bench_engine.py --llama-bench /tmp/llama.cpp/build/bin/llama-bench \
        --tokenizer-from .devdata/qwen05-tokenizer.gguf --vocab 151936 --resident-weights quantized
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from synth import SHAPES, write_synthetic_model  # noqa: E402

from worker_orcd.engine.api import Engine, GenerationEnd, ResidentModel, SamplingParams, TokenEvent  # noqa: E402
from worker_orcd.loader import LoadOptions, validate_model  # noqa: E402
from worker_orcd.residency import load_sealed  # noqa: E402
from worker_orcd.seal import Sealer  # noqa: E402

def d2d_bandwidth(n_bytes: int = 2 << 30, reps: int = 20) -> float:
    """Bytes moved (read + written) per second by a large device-to-device copy."""
    a = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        b.copy_(a)
    stop.record()
    stop.synchronize()
    seconds = start.elapsed_time(stop) / 1e3
    del a, b
    torch.cuda.empty_cache()
    return 2 * n_bytes * reps / seconds


def _generate(rm: ResidentModel, ids: list[int], max_tokens: int) -> tuple[list[int], GenerationEnd]:
    toks: list[int] = []
    end = None
    for ev in rm.generate(ids, SamplingParams(max_tokens=max_tokens)):
        if isinstance(ev, TokenEvent):
            toks.append(ev.token_id)
        else:
            end = ev
    if end is None or len(toks) != max_tokens:
        raise RuntimeError(f"generation ended early: {len(toks)} of {max_tokens} tokens, end={end}")
    return toks, end


def llama_bench(binary: str, path: Path, prompt_tokens: int, gen_tokens: int, timeout_s: float = 900.0) -> dict[str, float]:
    """llama.cpp's pp and tg tok/s on ``path`` (``llama-bench -o json``, flash attention, all layers on the GPU)."""
    cmd = [binary, "-m", str(path), "-p", str(prompt_tokens), "-n", str(gen_tokens), "-fa", "1", "-ngl", "99",
           "-r", "3", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exited {proc.returncode}: {proc.stderr[-2000:]}")
    return parse_llama_bench(proc.stdout)


def parse_llama_bench(out: str) -> dict[str, float]:
    """``{"pp": tok/s, "tg": tok/s}`` from llama-bench's JSON array (one record per test: a prompt
    test has n_gen 0, a generation test n_prompt 0); a missing test is an error, not a zero."""
    records = json.loads(out)
    got: dict[str, float] = {}
    for r in records:
        if r["n_prompt"] > 0 and r["n_gen"] == 0:
            got["pp"] = float(r["avg_ts"])
        elif r["n_gen"] > 0 and r["n_prompt"] == 0:
            got["tg"] = float(r["avg_ts"])
    if set(got) != {"pp", "tg"}:
        raise ValueError(f"llama-bench output lacks a prompt or a generation test: {sorted(got)}")
    return got


def decode_bytes_per_token(rm: ResidentModel, seq_len: int) -> int:
    """Bytes one decode step must read: all weights but the embedding table (one row is read),
    unless the head is tied to it, plus K and V of every cached position."""
    w = rm._weights
    weights = w.arena.numel()
    if not rm.config.tied_embeddings:
        emb = w.embed
        weights -= emb.numel() * emb.element_size() if isinstance(emb, torch.Tensor) else emb.raw.numel()
    kv = 2 * rm.config.n_layers * rm.config.kv_dim * w.dtype.itemsize * seq_len
    return weights + kv


def bench_one(
    engine: Engine, shape: str, wtype: str, workdir: Path, bw: float, args: argparse.Namespace
) -> dict[str, Any]:
    path = workdir / f"synth-{shape}-{wtype}.gguf"
    t = time.perf_counter()
    if not path.exists():
        s = SHAPES[shape] if args.vocab is None else dataclasses.replace(SHAPES[shape], vocab=args.vocab)
        write_synthetic_model(path, s, wtype, tokenizer_from=args.tokenizer_from)  # type: ignore[arg-type]
    write_s = time.perf_counter() - t
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # the one-pass load, as `serve` and `generate` run it (no expected digest, no key: the upload hashes)
    prof = cProfile.Profile() if args.cprofile_load else None
    if prof is not None:
        prof.enable()
    vm = validate_model(str(path), LoadOptions(model_root=path.parent), one_pass=True)
    validate_s = time.perf_counter() - t0
    sealed = load_sealed(engine, vm, shard_id=f"bench-{shape}-{wtype}", sealer=Sealer(), kv_cache_mb=args.kv_cache_mb)
    rm = sealed.resident
    ready_s = time.perf_counter() - t0
    if prof is not None:  # where the loading thread's time to ready goes (the upload's thread is not in it)
        prof.disable()
        stats = pstats.Stats(prof, stream=sys.stdout)
        stats.sort_stats("cumulative").print_stats(args.cprofile_load)
        stats.sort_stats("tottime").print_stats(args.cprofile_load)
    try:
        vocab = rm.config.vocab_size
        prompt = [(i * 7919 + 13) % vocab for i in range(args.prompt_tokens)]
        runner = rm.runner
        # one step of the whole prompt, as a request's prompt runs (a mixed-step graph when the prompt fits
        # the load's largest bucket, PREFILL_CHUNK_CUDA = 512 tokens) and as eager launches
        prefill_tps: dict[bool, float] = {}
        for eager in (False, True):
            runner.prefill_logits(prompt, eager=eager)  # warm-up: compiles the kernels for this length
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                s = time.perf_counter()
                logits = runner.prefill_logits(prompt, eager=eager)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - s)
            if not torch.isfinite(logits).all():
                raise RuntimeError("non-finite logits after prefill")
            prefill_tps[eager] = args.prompt_tokens / min(times)
        _, end1 = _generate(rm, prompt, 1)
        ttft_ms = end1.ttft_ms
        short = prompt[: args.decode_prompt]
        _generate(rm, short, 8)  # warm-up of the decode path
        toks, end = _generate(rm, short, args.decode_tokens)
        per_token_s = end.decode_time_ms / 1e3 / (end.tokens_out - 1)
        decode_tps = 1.0 / per_token_s
        sealed.verify_seal()
        seal_ms = statistics.median(sealed.verify_seal() for _ in range(10))
        mid_seq = args.decode_prompt + args.decode_tokens // 2
        roofline_s = decode_bytes_per_token(rm, mid_seq) / bw
        result = {
            "shape": shape,
            "type": wtype,
            "file_gb": vm.size / 1e9,
            "resident_gb": rm._weights.arena.numel() / 1e9,
            "vram_gb": rm.vram_bytes() / 1e9,
            "write_s": write_s,
            "validate_s": validate_s,
            "load_gb_s": rm.load_stats.gb_per_s,
            "time_to_ready_s": ready_s,
            "prefill_tok_s": prefill_tps[False],
            "prefill_eager_tok_s": prefill_tps[True],
            "prefill_graph": bool(runner.mixed_graphs) and args.prompt_tokens <= max(runner.mixed_graphs)[0],
            "ttft_ms": ttft_ms,
            "decode_tok_s": decode_tps,
            "roofline_pct": 100.0 * roofline_s / per_token_s,
            "seal_verify_ms": seal_ms,
            "graph": rm.graph_captured,
            "load_stages_s": rm.load_stages,
            "upload_s": rm.load_stats.seconds,  # beside the warm-up on one GPU (load_stages: upload-wait)
            "tokens_head": toks[:8],
        }
    finally:
        rm.close()
    try:
        if args.llama_bench:  # the same file, after worker-orcd has let go of the GPU memory
            torch.cuda.empty_cache()
            lb = llama_bench(args.llama_bench, path, args.prompt_tokens, args.decode_tokens)
            result.update(llama_pp_tok_s=lb["pp"], llama_tg_tok_s=lb["tg"],
                          pp_ratio=prefill_tps[False] / lb["pp"], tg_ratio=decode_tps / lb["tg"])
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    return result


def _table(rows: list[dict[str, Any]], bw: float) -> str:
    llama = any("llama_tg_tok_s" in r for r in rows)
    head = (
        "| shape | type | file GB | resident GB | load GB/s | ready s | pp512 tok/s | TTFT ms "
        "| decode tok/s | % roofline | seal ms |"
    )
    if llama:
        head += " llama.cpp pp512 | pp ratio | llama.cpp tg128 | tg ratio |"
    lines = [f"D2D copy bandwidth (read+write): {bw / 1e9:.0f} GB/s", "", head, "|" + "---|" * (15 if llama else 11)]
    for r in rows:
        line = (
            f"| {r['shape']} | {r['type']} | {r['file_gb']:.2f} | {r['resident_gb']:.2f} | {r['load_gb_s']:.2f} | "
            f"{r['time_to_ready_s']:.1f} | {r['prefill_tok_s']:.0f} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.0f} | "
            f"{r['roofline_pct']:.0f}% | {r['seal_verify_ms']:.2f} |"
        )
        if llama:
            line += (
                f" {r['llama_pp_tok_s']:.0f} | {r['pp_ratio']:.2f}x | {r['llama_tg_tok_s']:.1f} | {r['tg_ratio']:.2f}x |"
                if "llama_tg_tok_s" in r else " - | - | - | - |"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="worker-orcd engine benchmark (GPU)")
    ap.add_argument(
        "--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b", help="comma-separated: " + ",".join(SHAPES)
    )
    ap.add_argument("--types", default="F16,Q8_0,Q4_K_M", help="comma-separated: F16,Q8_0,Q4_K_M")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "worker-orcd-bench")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-prompt", type=int, default=16, help="prompt length for the decode measurement")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--kv-cache-mb", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model files")
    ap.add_argument("--resident-weights", choices=("dense", "quantized", "quantized-half2"), default="dense")
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary: run it on the same files")
    ap.add_argument("--tokenizer-from", type=Path, default=None, help="copy this GGUF's tokenizer into the models")
    ap.add_argument("--vocab", type=int, default=None, help="embedding rows (llama.cpp wants the tokenizer's count)")
    ap.add_argument("--cprofile-load", type=int, default=0, metavar="N",
                    help="profile the load (validate + load + seal) on the loading thread: N top functions")
    args = ap.parse_args(argv)
    if args.llama_bench and args.tokenizer_from is None:
        ap.error("--llama-bench needs --tokenizer-from (llama.cpp loads the model's tokenizer)")
    shapes = [s for s in args.shapes.split(",") if s]
    types = [t for t in args.types.split(",") if t]
    bad = [s for s in shapes if s not in SHAPES] + [t for t in types if t not in ("F16", "Q8_0", "Q4_K_M")]
    if bad:
        print(f"unknown shape/type: {bad}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_engine needs a CUDA GPU", file=sys.stderr)
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    engine = Engine.open("cuda", 0, resident_weights=args.resident_weights)
    bw = d2d_bandwidth()
    rows: list[dict[str, Any]] = []
    failed = False
    for shape in shapes:
        for wtype in types:
            try:
                row = bench_one(engine, shape, wtype, args.workdir, bw, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
            except Exception:  # noqa: BLE001 - report every failure, then fail the run
                failed = True
                print(f"FAILED {shape} {wtype}:", file=sys.stderr)
                traceback.print_exc()
    print(_table(rows, bw))
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        payload = {
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "d2d_bytes_per_s": bw,
            "results": rows,
        }
        (Path(out) / "bench_engine.json").write_text(json.dumps(payload, indent=2))
    engine.close()
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
