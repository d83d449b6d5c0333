"""The daemon on the GPU: process start -> ready, server vs client decode rate, SIGTERM -> exit.

    python scripts/make_tokenizer_donor.py ~/.cache/worker-orcd-models/qwen2.5-coder-0.5b-instruct.gguf \
        .devdata/qwen05-tokenizer.gguf    # here; carry .devdata to the GPU machine
    python benchmarks/bench_serve.py --tokenizer-from .devdata/qwen05-tokenizer.gguf

For each shape a synthetic random-weight model of the real shape is written
with a real tokenizer copied in (``synth.py --tokenizer-from``); then
``worker-orcd serve --device cuda`` is started as a real process and timed
until ``/health`` says ``ready`` (validate + upload + graphs + seal). For
shapes whose vocabulary matches the tokenizer, one greedy ``/worker/execute``
of 128 tokens is streamed: the server's own decode rate (``end`` event) is
compared with the rate the client observes between ``token`` events. Their
difference is NOT a per-token latency (a constant delay leaves both rates
equal): ``bench_latency.py`` measures that. Exits non-zero on error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth import write_synthetic_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sse_events(resp: httpx.Response):
    event, data = None, []
    for line in resp.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and event is not None:
            yield event, json.loads("\n".join(data)), time.perf_counter()
            event, data = None, []


def run_one(shape: str, wtype: str, args: argparse.Namespace, work: Path, token: str, tok_file: Path) -> dict:
    path = work / f"serve-{shape}-{wtype}.gguf"
    if not path.exists():
        write_synthetic_model(path, shape, wtype, tokenizer_from=args.tokenizer_from)  # type: ignore[arg-type]
    port = free_port()
    cmd = [
        sys.executable, "-m", "worker_orcd", "serve", "--worker-id", f"bench-{shape}", "--device", args.device,
        "--model", path.name, "--model-root", str(work), "--bind", f"127.0.0.1:{port}",
        "--api-token-file", str(tok_file), "--kv-cache-size-mb", "1024", "--log-level", "warning",
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"serve-{shape}.log", "w"))
    url = f"http://127.0.0.1:{port}"
    ready_s = None
    row: dict = {"shape": shape, "type": wtype, "file_gb": path.stat().st_size / 1e9}
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            while time.perf_counter() - t0 < 300:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {proc.returncode}; see {work}/serve-{shape}.log")
                try:
                    if c.get("/health").json().get("state") == "ready":
                        ready_s = time.perf_counter() - t0
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            if ready_s is None:
                raise RuntimeError("not ready within 300 s")
            row["start_to_ready_s"] = ready_s
            if shape in args.generate:
                body = {"prompt": "def quicksort(items):", "params": {"max_tokens": args.tokens, "temperature": 0.0}}
                headers = {"Authorization": f"Bearer {token}"}
                for _ in range(2):  # first run warms the HTTP path; keep the second
                    times, end = [], None
                    t_req = time.perf_counter()
                    with c.stream("POST", "/worker/execute", json=body, headers=headers, timeout=120) as r:
                        r.raise_for_status()
                        for event, data, t in sse_events(r):
                            if event == "token":
                                times.append(t)
                            elif event in ("end", "error"):
                                end = (event, data)
                if end is None or end[0] != "end":
                    raise RuntimeError(f"stream ended with {end}")
                data = end[1]
                n = data["tokens_out"]
                server_tps = (n - 1) / (data["decode_time_ms"] / 1e3) if n > 1 else 0.0
                client_tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
                row.update(
                    tokens_out=n,
                    stop_reason=data.get("stop_reason"),
                    server_ttft_ms=data.get("ttft_ms"),
                    client_ttft_ms=(times[0] - t_req) * 1e3 if times else None,
                    server_decode_tok_s=server_tps,
                    client_tok_s=client_tps,
                )
        t_stop = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        row["exit_code"] = proc.wait(timeout=60)
        row["sigterm_to_exit_s"] = time.perf_counter() - t_stop
    finally:
        if proc.poll() is None:
            proc.kill()
        if not args.keep:
            path.unlink(missing_ok=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-from", type=Path, required=True, help="GGUF whose tokenizer.* metadata is copied in")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-7b")
    ap.add_argument("--generate", default="qwen2.5-0.5b,qwen2.5-1.5b", help="shapes to stream from")
    ap.add_argument("--type", default="F16")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check this script without a GPU")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/worker-orcd-serve-bench"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.generate = set(args.generate.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    token = os.urandom(24).hex()
    tok_file = args.workdir / "token"
    tok_file.write_text(token + "\n")
    tok_file.chmod(0o600)
    rows = [run_one(s, args.type, args, args.workdir, token, tok_file) for s in args.shapes.split(",")]
    for r in rows:
        print(json.dumps(r))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_serve.json").write_text(json.dumps(rows, indent=2))
    print("| shape | type | start->ready s | server decode tok/s | client tok/s | client TTFT ms | SIGTERM->exit s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        def f(k: str, fmt: str) -> str:
            return format(r[k], fmt) if r.get(k) is not None else "-"
        print(f"| {r['shape']} | {r['type']} | {f('start_to_ready_s', '.1f')} | {f('server_decode_tok_s', '.0f')} | "
              f"{f('client_tok_s', '.0f')} | {f('client_ttft_ms', '.1f')} | {f('sigterm_to_exit_s', '.1f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
