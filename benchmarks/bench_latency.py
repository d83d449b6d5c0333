"""HTTP/SSE latency per token: the engine hands a token to the HTTP layer -> a client has parsed it.

    python benchmarks/bench_latency.py --tokenizer-from .devdata/qwen05-tokenizer.gguf   # GPU machine
    python benchmarks/bench_latency.py --model ~/.cache/worker-orcd-models/qwen2.5-coder-0.5b-instruct.gguf \
        --device cpu --tokens 16 --runs 2                                                 # a CPU check

The real daemon (``serve()`` with the real engine binding) runs in this
process; only the engine's ``ResidentModel.generate``/``generate_into`` is wrapped, to read
``CLOCK_MONOTONIC`` the moment each ``TokenEvent`` leaves the engine for the
HTTP layer (detokenizing, SSE framing, uvicorn, the socket all come after).
A client in a separate process reads the same clock when a ``token`` event's
frame is complete. Latency = receive - emit, per token, over ``--runs``
streams after one warm-up; p50/p90/p99/max are printed as JSON and as a
Markdown row. One stream at a time (batch 1). Exits non-zero on error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import sse_events  # noqa: E402
from synth import write_synthetic_model  # noqa: E402

from worker_orcd.config import load_config  # noqa: E402
from worker_orcd.lifecycle import EngineBinding, State, Worker  # noqa: E402
from worker_orcd.serve import real_binding, serve  # noqa: E402


class _Stamped:
    """Delegates to the wrapped object; ``generate`` and ``generate_into`` record (token index, emit ns)
    of each token."""

    def __init__(self, inner: Any, stamps: list[list[tuple[int, int]]]) -> None:
        self._inner, self._stamps = inner, stamps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, prompt_ids: Sequence[int], params: Any, cancel: Any = None) -> Iterator[Any]:
        events = self._inner.generate(prompt_ids, params, cancel)  # validation errors raise here, as before
        run: list[tuple[int, int]] = []
        self._stamps.append(run)

        def stamped() -> Iterator[Any]:
            for ev in events:
                if hasattr(ev, "token_id"):
                    run.append((ev.index, time.monotonic_ns()))
                yield ev

        return stamped()

    def generate_into(self, prompt_ids: Sequence[int], params: Any, cancel: Any, sink: Callable[[Any], None]) -> None:
        """The path the HTTP stream takes with the batching engine (without it no token is stamped)."""
        run: list[tuple[int, int]] = []

        def stamped(ev: Any) -> None:
            if hasattr(ev, "token_id"):
                run.append((ev.index, time.monotonic_ns()))
            sink(ev)

        self._inner.generate_into(prompt_ids, params, cancel, stamped)  # validation errors raise here, as before
        self._stamps.append(run)


class _StampingEngine:
    def __init__(self, inner: Any, stamps: list[list[tuple[int, int]]]) -> None:
        self._inner, self._stamps = inner, stamps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, *args: Any, **kw: Any) -> Any:
        return _Stamped(self._inner.load(*args, **kw), self._stamps)


def client(url: str, token: str, tokens: int, runs: int, prompt: str) -> list[list[tuple[int, int]]]:
    """Each run: (token index, receive ns) of every token event, the first run a warm-up."""
    body = {"prompt": prompt, "params": {"max_tokens": tokens, "temperature": 0.0}}
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as c:
        for _ in range(runs + 1):
            got: list[tuple[int, int]] = []
            end = None
            with c.stream("POST", "/worker/execute", json=body) as r:
                r.raise_for_status()
                for event, data, _ in sse_events(r):
                    if event == "token":
                        got.append((data["i"], time.monotonic_ns()))
                    elif event in ("end", "error"):
                        end = (event, data)
            if end is None or end[0] != "end":
                raise RuntimeError(f"stream ended with {end}")
            out.append(got)
    return out


def percentiles(values_us: list[float]) -> dict[str, float]:
    v = sorted(values_us)

    def q(p: float) -> float:
        return v[min(len(v) - 1, round(p * (len(v) - 1)))]

    return {"n": len(v), "p50_us": q(0.50), "p90_us": q(0.90), "p99_us": q(0.99), "max_us": v[-1]}


def serve_and_measure(args: argparse.Namespace) -> dict[str, Any]:
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.model is not None:
        model = args.model.resolve()
    else:
        model = work / f"latency-{args.shape}-{args.type}.gguf"
        if not model.exists():
            write_synthetic_model(model, args.shape, args.type, tokenizer_from=args.tokenizer_from)
    token = os.urandom(24).hex()
    tok_file = work / "token"
    tok_file.write_text(token + "\n")
    tok_file.chmod(0o600)
    config = load_config(
        {
            "worker_id": "bench-latency", "device": args.device, "bind": "127.0.0.1:0",
            "model_root": str(model.parent), "model": model.name, "api_token_file": str(tok_file),
            "kv_cache_size_mb": 1024, "log_level": "warning",
        },
        env={},
    )  # fmt: skip
    stamps: list[list[tuple[int, int]]] = []
    base = real_binding(config)
    binding = EngineBinding(
        open=lambda: _StampingEngine(base.open(), stamps), sampling_params=base.sampling_params, tokenizer=base.tokenizer
    )
    box: dict[str, Any] = {}

    def on_worker(w: Worker) -> None:
        box["worker"], box["loop"] = w, asyncio.get_running_loop()

    thread = threading.Thread(
        target=lambda: box.setdefault("exit", asyncio.run(serve(config, binding, force_exit=lambda c: None, on_worker=on_worker))),
        daemon=True,
    )
    t0 = time.perf_counter()
    thread.start()
    while not (w := box.get("worker")) or w.state != State.READY or w.uri is None:
        if not thread.is_alive() or time.perf_counter() - t0 > 600:
            raise RuntimeError(f"the worker did not become ready (exit {box.get('exit')})")
        time.sleep(0.05)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--client", w.uri, "--client-token-file", str(tok_file), "--tokens", str(args.tokens),
             "--runs", str(args.runs), "--prompt", args.prompt],
            check=True, capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
    finally:
        box["loop"].call_soon_threadsafe(w.request_shutdown, "benchmark done")
        thread.join(60)
    received = json.loads(proc.stdout)
    if len(received) != len(stamps):
        raise RuntimeError(f"{len(received)} client streams but {len(stamps)} engine streams")
    lat, first = [], []
    for emitted, got in list(zip(stamps, received, strict=True))[1:]:  # drop the warm-up
        emit = dict(emitted)
        if [i for i, _ in got] != [i for i, _ in emitted]:
            raise RuntimeError("the client did not receive the tokens the engine emitted, in order")
        for i, t in got:
            (first if i == 0 else lat).append((t - emit[i]) / 1e3)
    return {
        "model": model.name, "device": args.device, "tokens": args.tokens, "runs": args.runs,
        "per_token": percentiles(lat + first), "first_token": percentiles(first),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="an existing GGUF with a tokenizer (e.g. the real 0.5B)")
    src.add_argument("--tokenizer-from", type=Path, help="write a synthetic --shape model with this GGUF's tokenizer")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--type", default="F16")
    ap.add_argument("--device", default="cuda", help="cuda; cpu to check this script without a GPU")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="measured streams (after one warm-up)")
    ap.add_argument("--prompt", default="def quicksort(items):")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/worker-orcd-latency-bench"))
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the client process
    ap.add_argument("--client-token-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        token = args.client_token_file.read_text().strip()
        print(json.dumps(client(args.client, token, args.tokens, args.runs, args.prompt)))
        return 0
    if args.model is None and args.tokenizer_from is None:
        ap.error("give --model or --tokenizer-from")
    result = serve_and_measure(args)
    print(json.dumps(result, indent=2))
    p, f = result["per_token"], result["first_token"]
    print("| model | device | tokens x runs | p50 µs | p90 µs | p99 µs | max µs | first token p50 µs |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {result['model']} | {result['device']} | {result['tokens']} x {result['runs']} | {p['p50_us']:.0f} | "
          f"{p['p90_us']:.0f} | {p['p99_us']:.0f} | {p['max_us']:.0f} | {f['p50_us']:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
