"""The HTTP/SSE side's capacity without a GPU: how many tokens per second the real server streams.

A worker process runs the real ``serve()`` (FastAPI, uvicorn, SSE, auth, metrics) over the real
engine loop (batching/loop.py) with a runner that behaves like a device with ``--step-ms``
steps (bench_host.NullRunner) and the tests' fake engine around it (tiny GGUF, byte tokenizer).
This process runs N streaming clients (httpx) and reports tokens/s and the gaps between tokens.
On a small model the GPU step is ~1-1.5 ms at 64 rows: if this server cannot stream 64 tokens
per step in that time, the HTTP side, not the GPU, bounds throughput.

    python benchmarks/bench_http.py --clients 1 16 64 128 --step-ms 1.3 --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

TOKEN = "tok-bench-" + "b" * 32


def serve_main(port_file: Path, step_ms: float, max_batch: int) -> int:
    """The worker process: real serve() with a batching fake resident."""
    import test_http_fakes as F  # the tests' fake engine: tiny GGUF, byte tokenizer, full protocol
    from bench_host import NullRunner

    from worker_orcd.batching.loop import EngineLoop
    from worker_orcd.config import load_config
    from worker_orcd.serve import serve

    class Resident(F.FakeResident):
        def __init__(self, knobs: F.Knobs) -> None:
            super().__init__(knobs)
            self.loop = EngineLoop(NullRunner(step_ms / 1e3, token=100), max_batch=max_batch,
                                   token_budget=max(512, max_batch))

        @property
        def max_seq_len(self) -> int:
            return 8192

        @property
        def max_batch(self) -> int:
            return max_batch

        def stats(self) -> dict[str, int]:
            return {**self.loop.stats(), "max_batch": max_batch}

        def generate(self, prompt_ids, params, cancel=None):  # type: ignore[no-untyped-def]
            return self.loop.submit(list(prompt_ids), params, cancel)

        def generate_into(self, prompt_ids, params, cancel, sink):  # type: ignore[no-untyped-def]
            self.loop.submit_to(list(prompt_ids), params, cancel, sink)

        def close(self) -> None:
            self.loop.close()
            super().close()

    class Engine(F.FakeEngine):
        def load(self, *a, **k):  # type: ignore[no-untyped-def]
            super().load(*a, **k).close()  # the fake's load contract (hash the file, report its digest)
            self.models.clear()
            r = Resident(self.knobs)
            self.models.append(r)
            return r

    knobs = F.Knobs(max_seq_len=8192)
    tmp = Path(tempfile.mkdtemp())
    root = tmp / "models"
    root.mkdir()
    F.write_tiny_model(root / F.MODEL_NAME)
    tok = tmp / "token"
    tok.write_text(TOKEN + "\n")
    tok.chmod(0o600)
    config = load_config({
        "worker_id": "w-bench", "device": "cpu", "bind": "127.0.0.1:0", "model_root": str(root),
        "api_token_file": str(tok), "model": F.MODEL_NAME, "max_batch": max_batch, "max_queue": 1024,
    }, env={})
    binding = F.fake_binding(knobs)
    binding = type(binding)(open=lambda: Engine(knobs), sampling_params=binding.sampling_params,
                            tokenizer=binding.tokenizer)

    def announce(worker) -> None:  # type: ignore[no-untyped-def]
        async def wait_uri() -> None:
            while worker.uri is None:
                await asyncio.sleep(0.01)
            port_file.write_text(worker.uri)
        asyncio.get_running_loop().create_task(wait_uri())

    if os.environ.get("BENCH_SWITCH_MS"):  # the GIL's switch interval in the server (CPython's default: 5 ms)
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_MS"]) / 1e3)
    prof_out = os.environ.get("BENCH_HTTP_PROFILE")  # cProfile of the event-loop thread (the HTTP side)
    if not prof_out:
        return asyncio.run(serve(config, binding, on_worker=announce, settle_heap_after_load=True))
    import cProfile
    import signal

    prof = cProfile.Profile()

    def dump(*_: object) -> None:
        prof.disable()
        prof.dump_stats(prof_out)
        os._exit(0)

    signal.signal(signal.SIGUSR1, dump)
    prof.enable()
    return asyncio.run(serve(config, binding, on_worker=announce, settle_heap_after_load=True))


async def clients(url: str, n: int, tokens: int, openai: bool = False) -> dict[str, float]:
    import httpx

    gaps: list[float] = []
    count = [0]
    if openai:  # the route bench_load.py drives: /v1/completions, one `data:` chunk per token
        path, mark = "/v1/completions", "data: {"
        body = {"model": "tiny.gguf", "prompt": "hello world", "max_tokens": tokens, "temperature": 0, "stream": True}
    else:
        path, mark = "/worker/execute", "event: token"
        body = {"prompt": "hello world", "params": {"max_tokens": tokens, "temperature": 0}}

    async def one(c: httpx.AsyncClient) -> None:
        last = None
        async with c.stream("POST", url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if line.startswith(mark):
                    now = time.perf_counter()
                    count[0] += 1
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for _ in range(n)))
        wall = time.perf_counter() - t0
    gaps.sort()
    return {"clients": n, "tok_s": count[0] / wall, "tokens": count[0],
            "gap_p50_ms": gaps[len(gaps) // 2] * 1e3 if gaps else 0.0,
            "gap_p99_ms": gaps[int(len(gaps) * 0.99)] * 1e3 if gaps else 0.0}


def _cpu_s(pid: int) -> float:
    """The server process's user + system CPU seconds so far (every thread: the fake engine's too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 16, 64, 128])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=1.3)
    ap.add_argument("--openai", action="store_true", help="stream /v1/completions instead of /worker/execute")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve_main(Path(args.serve), args.step_ms, max(args.clients))
    port_file = Path(tempfile.mkdtemp()) / "uri"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), "--step-ms", str(args.step_ms),
                             "--clients", *map(str, args.clients)], stdout=subprocess.DEVNULL,
                            stderr=open(port_file.with_suffix(".log"), "w"), env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 60
        while not port_file.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if not port_file.exists():
            print(port_file.with_suffix(".log").read_text()[-3000:], file=sys.stderr)
            return 1
        url = port_file.read_text().strip()
        if os.environ.get("BENCH_HTTP_PID_FILE"):  # for a profiler attached from outside
            Path(os.environ["BENCH_HTTP_PID_FILE"]).write_text(str(proc.pid))
        print(f"step {args.step_ms} ms (simulated device), {args.tokens} tokens per request, "
              f"{'/v1/completions' if args.openai else '/worker/execute'}")
        print("| clients | tokens/s | gap p50 / p99 ms | server CPU ms per 1k tokens |")
        print("|---:|---:|---|---:|")
        for n in args.clients:
            cpu0 = _cpu_s(proc.pid)
            r = asyncio.run(clients(url, n, args.tokens, args.openai))
            r["server_cpu_ms_per_1k"] = (_cpu_s(proc.pid) - cpu0) * 1e6 / max(1, r["tokens"])
            print(f"| {n} | {r['tok_s']:,.0f} | {r['gap_p50_ms']:.2f} / {r['gap_p99_ms']:.2f} | "
                  f"{r['server_cpu_ms_per_1k']:.1f} |", flush=True)
            print(json.dumps(r), file=sys.stderr)
    finally:
        if os.environ.get("BENCH_HTTP_PROFILE"):
            import signal

            proc.send_signal(signal.SIGUSR1)
            proc.wait(30)
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
