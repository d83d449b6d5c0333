"""The OpenAI streaming path against /worker/execute on the same served model (GPU).

    python benchmarks/bench_openai.py --tokenizer-from .devdata/qwen05-tokenizer.gguf

Starts ``worker-orcd serve`` on a synthetic random-weight model of the real
shape with the real tokenizer (as bench_serve.py does), with a tiny shim that
records, per stream, the monotonic time each SSE event leaves ``JobStream.frames``
(CLOCK_MONOTONIC is shared by processes on one host). The client records when
each event arrives, so per event: emit -> receive latency. Per path it reports
client tok/s, client TTFT, latency p50/p99; then the same OpenAI request with
``response_format`` json_schema (an array of at least N/2 digits: the grammar mask on every token) for the
structured-output overhead per token. Random weights emit arbitrary tokens, so
``ignore_eos``-like behaviour is forced by the prompt length only: rows with
fewer tokens than asked are reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import free_port  # noqa: E402
from synth import write_synthetic_model  # noqa: E402

SHIM = """
import json, os, sys, time
from worker_orcd.http import stream as S
_orig = S.JobStream.frames
async def frames(self):
    times = []
    try:
        async for chunk in _orig(self):
            if not chunk.startswith(b":"):
                times.append(time.monotonic())
            yield chunk
    finally:
        with open(os.environ["BENCH_EMIT_LOG"], "a") as fh:
            fh.write(json.dumps({"job": self.job.job_id, "t": times}) + "\\n")
S.JobStream.frames = frames
from worker_orcd.cli import main
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def stream(c: httpx.Client, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[str, list[float], float, int]:
    """(job id, receive time per SSE event, request start, tokens/content chunks)."""
    t_req, times, n = time.monotonic(), [], 0
    with c.stream("POST", path, json=body, headers=headers, timeout=300) as r:
        r.raise_for_status()
        job = r.headers["x-job-id"]
        for line in r.iter_lines():
            if line.startswith("data:"):
                times.append(time.monotonic())
                if path.startswith("/v1"):
                    payload = line[5:].strip()
                    if payload != "[DONE]":
                        d = json.loads(payload)
                        choice = (d.get("choices") or [{}])[0]
                        if choice.get("text") or choice.get("delta", {}).get("content"):
                            n += 1
                elif '"t":' in line:
                    n += 1
    return job, times, t_req, n


def measure(c: httpx.Client, path: str, body: dict[str, Any], headers: dict[str, str], emit_log: Path, runs: int) -> dict[str, Any]:
    lat, tps, ttft, count = [], [], [], 0
    for i in range(runs + 1):  # the first run warms up
        job, times, t_req, n = stream(c, path, body, headers)
        time.sleep(0.2)
        emitted = {}
        for line in emit_log.read_text().splitlines():
            rec = json.loads(line)
            emitted[rec["job"]] = rec["t"]
        if i == 0:
            continue
        sent = emitted.get(job, [])
        lat += [(r - s) * 1e3 for s, r in zip(sent, times)]
        body_times = times[1:-2] if len(times) > 3 else times
        if len(body_times) > 1:
            tps.append((len(body_times) - 1) / (body_times[-1] - body_times[0]))
        ttft.append((times[1] - t_req) * 1e3 if len(times) > 1 else float("nan"))
        count = n
    return {"path": path, "tokens": count, "client_tok_s": statistics.median(tps) if tps else None,
            "client_ttft_ms": statistics.median(ttft), "emit_to_receive_ms_p50": pct(lat, 0.5),
            "emit_to_receive_ms_p99": pct(lat, 0.99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-from", type=Path, required=True)
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--type", default="F16")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check this script without a GPU")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/worker-orcd-openai-bench"))
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{args.shape}-{args.type}.gguf"
    if not model.exists():
        write_synthetic_model(model, args.shape, args.type, tokenizer_from=args.tokenizer_from)  # type: ignore[arg-type]
    token = os.urandom(24).hex()
    (work / "token").write_text(token + "\n")
    (work / "token").chmod(0o600)
    emit_log = work / "emit.jsonl"
    emit_log.write_text("")
    port = free_port()
    cmd = [sys.executable, "-c", SHIM, "--worker-id", "bench-openai", "--device", args.device, "--model", model.name,
           "--model-root", str(work), "--bind", f"127.0.0.1:{port}", "--api-token-file", str(work / "token"),
           "--max-tokens-out", str(max(4096, args.tokens)), "--log-level", "warning",
           *(["--allow-root"] if os.geteuid() == 0 else [])]
    env = {**os.environ, "BENCH_EMIT_LOG": str(emit_log),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "w"))
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as c:
            t0 = time.monotonic()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited {proc.returncode}; see {work}/serve.log")
                try:
                    if c.get("/health").json().get("state") == "ready":
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > 600:
                    raise RuntimeError("not ready in 600 s")
                time.sleep(0.1)
            h = {"Authorization": f"Bearer {token}"}
            prompt = "def quicksort(items):"
            rows.append(measure(c, "/worker/execute", {"prompt": prompt, "params": {"max_tokens": args.tokens}}, h,
                                emit_log, args.runs))
            oai = {"model": model.name, "prompt": prompt, "max_tokens": args.tokens, "temperature": 0, "stream": True}
            rows.append(measure(c, "/v1/completions", oai, h, emit_log, args.runs))
            chat = {"model": model.name, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.tokens,
                    "temperature": 0, "stream": True}
            rows.append(measure(c, "/v1/chat/completions", chat, h, emit_log, args.runs))
            # random weights would close a json_object at once: an array of at least N integers keeps the grammar busy
            forced = {"type": "json_schema", "json_schema": {"name": "ints", "schema": {
                "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": args.tokens // 2}}}
            rows.append({**measure(c, "/v1/chat/completions", {**chat, "response_format": forced}, h, emit_log, args.runs),
                         "path": "/v1/chat/completions json_schema"})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    base = rows[2]["client_tok_s"]
    for r in rows:
        if r["client_tok_s"] and base:
            r["us_per_token_vs_chat"] = 1e6 / r["client_tok_s"] - 1e6 / base
        print(json.dumps(r))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_openai.json").write_text(json.dumps(rows, indent=2))
    print("| path | tokens | client tok/s | client TTFT ms | emit->receive p50 ms | p99 ms | µs/token vs plain chat |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        print(f"| {r['path']} | {r['tokens']} | {f('client_tok_s', '.0f')} | {f('client_ttft_ms', '.1f')} | "
              f"{f('emit_to_receive_ms_p50', '.2f')} | {f('emit_to_receive_ms_p99', '.2f')} | {f('us_per_token_vs_chat', '.0f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
