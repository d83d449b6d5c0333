"""Closed-loop HTTP load against worker-orcd and llama-server on the same model file (issue 8).

N clients each send requests back to back through the OpenAI completions API
both servers speak (``POST /v1/completions``, ``stream: true``): a prompt of a
seeded random length in [--prompt-min, --prompt-max] tokens (words of the real
tokenizer), --out-min..--out-max output tokens, greedy. EOS is ignored where
the server allows (llama-server ``ignore_eos``); on the random-weight synthetic
models EOS is rare, and only tokens actually received are counted. Per
concurrency level: aggregate output tok/s (over the whole level, a burst with its
ramp-up and drain; or, with --duration, back-to-back requests and the tokens that
arrive after --warmup: the steady state), TTFT p50/p99 (request sent -> first
content chunk), ITL p50/p99 (gaps between chunks of one stream). Prints a
markdown table; JSON to $OUT/bench_load.json.

    python benchmarks/bench_load.py --model M.gguf --worker --llama /tmp/llama.cpp/build/bin/llama-server \
        --concurrency 1 8 32 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import free_port  # noqa: E402

WORDS = ("alpha beta gamma delta kernel batch token stream paged cache worker model prompt sample "
         "decode prefill graph tensor matrix vector").split()


MODEL_ID = [""]  # the served model's id (worker-orcd: the --model reference)
TP_MEMBERS: list[subprocess.Popen] = []  # --tp: the following ranks, stopped with rank 0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def prompts(n: int, args: argparse.Namespace, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.randint(args.prompt_min, args.prompt_max)  # ~1 token per word for these words
        out.append((" ".join(rng.choice(WORDS) for _ in range(words)), rng.randint(args.out_min, args.out_max)))
    return out


async def one_request(c: httpx.AsyncClient, prompt: str, max_tokens: int, llama: bool, stats: dict) -> None:
    body: dict[str, Any] = {"model": MODEL_ID[0], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}
    if llama:
        body["ignore_eos"] = True
    t0 = time.monotonic()
    last = None
    n = 0
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":  # read on to the body's end, as the OpenAI SDK does: the connection is reused
                continue
            chunk = json.loads(payload)
            choices = chunk.get("choices") or []
            if not choices or not choices[0].get("text"):
                continue
            now = time.monotonic()  # one clock for every client process (the window below)
            if last is None:
                stats["ttft"].append(now - t0)
            else:
                stats["itl"].append(now - last)
            last = now
            n += 1
            win = stats.get("window")
            if win is not None and win[0] <= now <= win[1]:
                stats["window_tokens"] += 1
    stats["tokens"] += n


async def run_clients(url: str, token: str, ids: list[int], plan: list[tuple[str, int]], per_client: int,
                      duration: bool, window: tuple[float, float] | None, start_at: float, llama: bool) -> dict[str, Any]:
    """Clients ``ids`` of a level in this process: requests back to back until the window closes
    (steady state), else ``per_client`` each; from ``start_at`` (the monotonic clock)."""
    stats: dict[str, Any] = {"ttft": [], "itl": [], "tokens": 0, "window": window, "window_tokens": 0}
    limits = httpx.Limits(max_connections=len(ids) + 4, max_keepalive_connections=len(ids) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as c:

        async def client(i: int) -> None:
            if duration:
                assert window is not None
                j = 0
                while time.monotonic() < window[1]:
                    p, m = plan[(i * per_client + j) % len(plan)]
                    await one_request(c, p, m, llama, stats)
                    j += 1
                return
            for j in range(per_client):
                p, m = plan[i * per_client + j]
                await one_request(c, p, m, llama, stats)

        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        await asyncio.gather(*(client(i) for i in ids))
    return stats


def client_process(url: str, token: str, ids: list[int], plan: list[tuple[str, int]], per_client: int,
                   duration: bool, window: tuple[float, float] | None, start_at: float, llama: bool,
                   model_id: str) -> dict[str, Any]:
    """One of --client-procs processes (spawned): its share of the clients, its own event loop."""
    MODEL_ID[0] = model_id
    return asyncio.run(run_clients(url, token, ids, plan, per_client, duration, window, start_at, llama))


async def run_level(url: str, token: str, n: int, args: argparse.Namespace, llama: bool) -> dict[str, Any]:
    plan = prompts(n * args.requests_per_client, args, seed=n)
    procs = max(1, min(args.client_procs, n))
    async with httpx.AsyncClient(base_url=url, timeout=600, headers={"Authorization": f"Bearer {token}"}) as c:
        await one_request(c, "warm up", 8, llama, {"ttft": [], "itl": [], "tokens": 0})
        before = {} if llama else await engine_counters(c)
        # client processes need ~1 s to start: every client (all processes) starts at t0
        t0 = time.monotonic() + (1.5 if procs > 1 else 0.0)
        window = (t0 + args.warmup, t0 + args.duration) if args.duration else None
        shares = [list(range(k, n, procs)) for k in range(procs)]
        common = (plan, args.requests_per_client, bool(args.duration), window, t0, llama)
        if procs == 1:
            parts = [await run_clients(url, token, shares[0], *common)]
        else:
            import concurrent.futures
            import multiprocessing

            with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as ex:
                futs = [asyncio.wrap_future(ex.submit(client_process, url, token, ids, *common, MODEL_ID[0]))
                        for ids in shares]
                parts = await asyncio.gather(*futs)
        wall = time.monotonic() - t0
        after = {} if llama else await engine_counters(c)
    stats: dict[str, Any] = {"ttft": [], "itl": [], "tokens": 0, "window_tokens": 0}
    for part in parts:
        for key in ("ttft", "itl"):
            stats[key] += part[key]
        stats["tokens"] += part["tokens"]
        stats["window_tokens"] += part["window_tokens"]
    eng = {k: after[k] - before.get(k, 0.0) for k in after}
    steps = eng.get("worker_batch_size_count", 0.0)
    gaps = {f"{key}_p{q}_ms": bucket_quantile(eng, metric, q / 100)
            for key, metric in (("step_gap", "worker_step_interval_ms"), ("server_itl", "worker_inter_token_latency_ms"),
                                ("channel", "worker_step_channel_ms"), ("loop_lag", "worker_step_loop_lag_ms"))
            for q in (50, 99)}
    return {**gaps,
        # worker-orcd's own view of the level (its /metrics): engine steps, mean rows per step, the time
        # spent verifying the seal (admitting steps) -- where the wall time went
        "engine_steps": steps, "engine_rows_per_step": eng.get("worker_batch_size_sum", 0.0) / steps if steps else None,
        "seal_checks": eng.get("worker_seal_verify_ms_count"), "seal_ms_total": eng.get("worker_seal_verify_ms_sum"),
        "clients": n, "tokens": stats["tokens"], "wall_s": wall,
        # --duration: tokens that arrived inside [warmup, duration] over that window (steady state);
        # else every token of the level over its wall time (a burst: ramp-up and drain included)
        "tok_s": (stats["window_tokens"] / (args.duration - args.warmup)) if args.duration else stats["tokens"] / wall,
        "ttft_p50_ms": pct(stats["ttft"], 0.5) * 1e3, "ttft_p99_ms": pct(stats["ttft"], 0.99) * 1e3,
        "itl_p50_ms": pct(stats["itl"], 0.5) * 1e3, "itl_p99_ms": pct(stats["itl"], 0.99) * 1e3,
    }


GAP_HISTOGRAMS = ("worker_step_interval_ms", "worker_inter_token_latency_ms", "worker_step_channel_ms",
                  "worker_step_loop_lag_ms")


async def engine_counters(c: httpx.AsyncClient) -> dict[str, float]:
    """Sums and counts of worker-orcd's step and seal histograms and the buckets of its two gap
    histograms (Prometheus text; keys ``NAME_bucket:LE``), 0 if absent."""
    want = ("worker_batch_size_count", "worker_batch_size_sum", "worker_seal_verify_ms_count",
            "worker_seal_verify_ms_sum")
    out = dict.fromkeys(want, 0.0)
    try:
        r = await c.get("/metrics")
    except httpx.HTTPError:
        return out
    for line in r.text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
        elif name.endswith("_bucket") and name[: -len("_bucket")] in GAP_HISTOGRAMS:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[f"{name}:{le}"] = float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantile(counters: dict[str, float], metric: str, q: float) -> float | None:
    """The q-quantile of a histogram's observations in a window (its bucket counts' differences),
    linear inside the bucket it falls in (Prometheus' histogram_quantile); None without data."""
    edges = sorted((float(k.rsplit(":", 1)[1]), v) for k, v in counters.items() if k.startswith(f"{metric}_bucket:"))
    if not edges or edges[-1][1] <= 0:
        return None
    rank = q * edges[-1][1]
    lo_edge, lo_count = 0.0, 0.0
    for le, count in edges:
        if count >= rank:
            if le == float("inf"):
                return lo_edge
            return lo_edge + (le - lo_edge) * ((rank - lo_count) / (count - lo_count) if count > lo_count else 1.0)
        lo_edge, lo_count = le, count
    return lo_edge


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=5) as c:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                r = c.get(path)
                if r.status_code == 200 and r.json().get("state", "ready") in ("ready", "ok"):
                    return time.perf_counter() - t0
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return time.perf_counter() - t0
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
    raise RuntimeError("not ready in time")


def upload_seconds(work: Path) -> tuple[float, float] | None:
    """(seconds, GB/s) of the engine's upload as rank 0 logged it (needs --worker-log-level info), else None."""
    log = work / "worker.log"
    found = re.findall(r"bytes in ([0-9.]+) s \(([0-9.]+) GB/s\)", log.read_text(errors="replace")) if log.exists() else []
    return (float(found[-1][0]), float(found[-1][1])) if found else None


def load_stages(work: Path) -> str | None:
    """The engine's "load stages (s): ..." log line (needs --worker-log-level info), else None."""
    log = work / "worker.log"
    found = re.findall(r"load stages \(s\): (.*)", log.read_text(errors="replace")) if log.exists() else []
    return found[-1].strip() if found else None


def log_tails(work: Path, lines: int = 25) -> None:
    """The last lines of every server log of this run: why a server was not ready (or was killed)."""
    for f in sorted(work.glob("*.log")):
        tail = f.read_text(errors="replace").splitlines()[-lines:]
        print(f"# --- {f.name} (last {len(tail)} lines)", flush=True)
        for line in tail:
            print(f"#   {line[:400]}", flush=True)


def start_worker(model: Path, args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, str, str]:
    token = "bench-" + os.urandom(8).hex()
    tok = work / "token"
    tok.write_text(token + "\n")
    tok.chmod(0o600)
    port = free_port()
    cmd = [sys.executable, "-m", "worker_orcd", "serve", "--worker-id", "bench", "--device", args.device,
           "--model", model.name, "--model-root", str(model.parent), "--bind", f"127.0.0.1:{port}",
           "--api-token-file", str(tok), "--log-level", args.worker_log_level, "--max-batch", str(max(args.concurrency)),
           "--max-tokens-out", "4096", *(["--allow-root"] if os.geteuid() == 0 else [])]
    if args.kv_cache_mb:
        cmd += ["--kv-cache-size-mb", str(args.kv_cache_mb)]
    if args.resident_weights:
        cmd += ["--resident-weights", args.resident_weights]
    cmd += args.worker_arg
    if args.tp > 1:  # a tensor-parallel group: rank r on GPU r; rank 0 serves, the others follow
        secret = work / "tp.secret"
        secret.write_text(os.urandom(24).hex() + "\n")
        secret.chmod(0o600)
        tp_port = free_port()
        members = ",".join(f"bench-r{r}" for r in range(args.tp))

        def tp_flags(rank: int) -> list[str]:
            return ["--tp-degree", str(args.tp), "--tp-rank", str(rank), "--tp-group-id", "bench", "--tp-members", members,
                    "--tp-master", f"127.0.0.1:{tp_port}", "--tp-secret-file", str(secret), "--gpu-device", str(rank)]

        cmd[cmd.index("--worker-id") + 1] = "bench-r0"
        cmd += tp_flags(0)
        for rank in range(1, args.tp):
            member = [sys.executable, "-m", "worker_orcd", "serve", "--worker-id", f"bench-r{rank}", "--device", args.device,
                      "--model", model.name, "--model-root", str(model.parent), "--log-level", args.worker_log_level,
                      "--max-batch", str(max(args.concurrency)), "--max-tokens-out", "4096", *tp_flags(rank),
                      *(["--allow-root"] if os.geteuid() == 0 else []),
                      *(["--kv-cache-size-mb", str(args.kv_cache_mb)] if args.kv_cache_mb else []),
                      *(["--resident-weights", args.resident_weights] if args.resident_weights else []),
                      *args.worker_arg]  # the same plan on every rank (the group refuses to form otherwise)
            TP_MEMBERS.append(subprocess.Popen(member, stdout=subprocess.DEVNULL,
                                               stderr=open(work / f"worker-r{rank}.log", "w")))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / "worker.log", "w"))
    return proc, f"http://127.0.0.1:{port}", token


def start_llama(binary: str, model: Path, args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    np_ = max(args.concurrency)
    ctx = np_ * (args.prompt_max + args.out_max + 64)
    cmd = [binary, "-m", str(model), "-ngl", "99", "-fa", "on", "-np", str(np_), "-c", str(ctx),
           "--host", "127.0.0.1", "--port", str(port), *args.llama_arg]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / "llama.log", "w"))
    return proc, f"http://127.0.0.1:{port}", "none"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--label", default=None)
    ap.add_argument("--worker", action="store_true", help="measure worker-orcd")
    ap.add_argument("--llama", default=None, help="llama-server binary to measure on the same file")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--llama-concurrency", nargs="+", type=int, default=None)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--duration", type=float, default=0.0,
                    help="seconds per level of back-to-back requests; tok/s counts tokens arriving after --warmup")
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds at the start of a --duration level not counted")
    ap.add_argument("--worker-arg", action="append", default=[],
                    help="extra worker-orcd serve argument (repeat; write --worker-arg=--mixed-step-tokens --worker-arg=192)")
    ap.add_argument("--resident-weights", choices=("dense", "quantized", "quantized-half2"), default=None, help="worker-orcd's (default: its own)")
    ap.add_argument("--tp", type=int, default=1, help="worker-orcd as a tensor-parallel group of this many GPUs")
    ap.add_argument("--llama-arg", action="append", default=[], help="extra llama-server argument (repeat; write --llama-arg=-sm --llama-arg=row)")
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--out-min", type=int, default=128)
    ap.add_argument("--out-max", type=int, default=256)
    ap.add_argument("--kv-cache-mb", type=int, default=None)
    ap.add_argument("--device", default="cuda", help="worker-orcd device (cpu: a smoke run only)")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="spread each level's clients over this many processes (steady state only): one "
                         "Python event loop parsing 6,000+ SSE events/s delays what it measures")
    ap.add_argument("--ready-timeout", type=float, default=600.0,
                    help="seconds a server may take to become ready; past it (or on SIGTERM) its log tails are printed")
    ap.add_argument("--worker-log-level", default="warning", help="worker-orcd's --log-level (info: its load stages)")
    args = ap.parse_args()
    if args.duration and not 0 <= args.warmup < args.duration:
        ap.error("--warmup must be in [0, --duration)")
    if args.client_procs < 1 or (args.client_procs > 1 and not args.duration):
        ap.error("--client-procs must be >= 1, and above 1 only with --duration (steady state)")
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))

    def on_term(signum: int, frame: object) -> None:  # `timeout` ends this run: say where the servers were
        log_tails(work)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    MODEL_ID[0] = args.model.name
    label = args.label or args.model.stem
    rows = []
    engines = ([("worker-orcd", start_worker, args.concurrency)] if args.worker else []) + (
        [("llama-server", lambda m, a, w: start_llama(args.llama, m, a, w), args.llama_concurrency or args.concurrency)]
        if args.llama else [])
    for name, start, levels in engines:
        proc, url, token = start(args.model, args, work)
        try:
            try:
                ready = wait_ready(url, proc, "/health", args.ready_timeout)
            except RuntimeError as e:
                print(f"# {name} on {label}: {e}", flush=True)
                log_tails(work)
                continue
            up = upload_seconds(work) if name == "worker-orcd" else None
            print(f"# {name} on {label}: ready in {ready:.1f} s"
                  + (f" (upload + SHA-256 {up[0]:.1f} s at {up[1]:.2f} GB/s; the rest: plan, warm-up, graphs, seal)"
                     if up else ""), flush=True)
            if name == "worker-orcd" and (st := load_stages(work)):
                print(f"# worker-orcd load stages (s): {st}", flush=True)
            for n in levels:
                r = asyncio.run(run_level(url, token, n, args, llama=name == "llama-server"))
                r.update(engine=name, model=label, ready_s=ready, upload_s=up[0] if up else None)
                rows.append(r)
                print(json.dumps(r), flush=True)
                print(f"| {name} | {label} | {n} | {r['tok_s']:,.0f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                      f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |", flush=True)
        finally:
            for p in [proc, *TP_MEMBERS]:  # rank 0 ends the group; a member still up after it is stopped too
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            TP_MEMBERS.clear()
    print("\n| engine | model | clients | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | engine steps | rows/step "
          "| seal checks (ms) | step gap p50 / p99 ms | server ITL p50 / p99 ms | channel p50 / p99 ms | loop lag p50 / p99 ms |")
    print("|---|---|---:|---:|---|---|---:|---:|---|---|---|---|---|")

    def gap(r: dict[str, Any], key: str) -> str:
        p50, p99 = r.get(f"{key}_p50_ms"), r.get(f"{key}_p99_ms")
        return "-" if p50 is None or p99 is None else f"{p50:.1f} / {p99:.1f}"

    for r in rows:
        eng = ("| - | - | - | - | - | - | - |" if r["engine"] != "worker-orcd" else
               f"| {r['engine_steps']:.0f} | {r['engine_rows_per_step'] or 0:.1f} | {r['seal_checks'] or 0:.0f} "
               f"({r['seal_ms_total'] or 0:.0f}) | {gap(r, 'step_gap')} | {gap(r, 'server_itl')} | {gap(r, 'channel')} "
               f"| {gap(r, 'loop_lag')} |")
        print(f"| {r['engine']} | {r['model']} | {r['clients']} | {r['tok_s']:,.0f} | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} {eng}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"bench_load_{label}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
