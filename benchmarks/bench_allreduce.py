"""All-reduce time per tensor-parallel step: what a group's 2 x n_layers sums cost per decode step.

Spawns ``--degree`` processes (one per GPU over NCCL, the backend and settings the engine uses:
tensor_parallel.join's NCCL env; or gloo on the CPU, to check the script), times ``all_reduce``
of an activation [rows, d_model] in the model's dtype, eager and captured in a CUDA graph as the
decode graphs do, and prints per call and per step (2 calls per layer: after attention's O and
the FFN's down projection).

    python benchmarks/bench_allreduce.py --degree 2 --d-model 3584 --layers 28 --rows 1 8 64 128 512
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _time_us(fn, device: torch.device, iters: int) -> float:  # noqa: ANN001
    """Median microseconds of ``fn`` over ``iters`` runs (the dequant benchmark's timer: CUDA events on a GPU)."""
    from worker_orcd.engine.dequant.bench import _time_ms

    return _time_ms(fn, device, iters) * 1e3


def _rank(rank: int, args: argparse.Namespace, port: int, q: mp.Queue) -> None:
    from worker_orcd.engine.tp_plan import BACKEND_BY_DEVICE, NCCL_SAFE_ENV

    cuda = args.device == "cuda"
    if cuda:
        for k, v in NCCL_SAFE_ENV.items():
            os.environ.setdefault(k, v)
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dist.init_process_group(BACKEND_BY_DEVICE[args.device], init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.degree)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows_out = []
    for rows in args.rows:
        x = torch.randn(rows, args.d_model, device=device).to(dtype)
        for _ in range(5):
            dist.all_reduce(x)  # warm-up (NCCL communicator, algorithm choice)
        eager = _time_us(lambda: dist.all_reduce(x), device, args.iters)
        graphed = None
        if cuda:
            calls = 2 * args.layers  # one decode step's sums, back to back in one graph
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                dist.all_reduce(x)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                for _ in range(calls):
                    dist.all_reduce(x)
            graphed = _time_us(g.replay, device, args.iters) / calls
        rows_out.append({"rows": rows, "bytes": x.numel() * x.element_size(), "eager_us": eager, "graph_us": graphed,
                         "step_ms": (graphed if graphed is not None else eager) * 2 * args.layers / 1e3})
    if rank == 0:
        q.put(rows_out)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--degree", type=int, default=2)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--d-model", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 128, 512])
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.degree:
        ap.error(f"--degree {args.degree} needs {args.degree} GPUs, {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, q)) for r in range(args.degree)]
    for p in procs:
        p.start()
    rows = q.get(timeout=600)
    print(f"all_reduce over {args.degree} ranks ({args.device}), [rows, {args.d_model}] {args.dtype}, "
          f"{2 * args.layers} calls per step")
    print("| rows | bytes | eager us | in a graph us | per step ms |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        g = "-" if r["graph_us"] is None else f"{r['graph_us']:.1f}"
        print(f"| {r['rows']} | {r['bytes']:,} | {r['eager_us']:.1f} | {g} | {r['step_ms']:.3f} |")
        print(json.dumps(r), flush=True)
    # the results first: a rank may hang in NCCL's teardown (a graph holding the communicator), and the
    # run_h200.sh timeout would then have killed the table with it (sixth session: nothing printed)
    for p in procs:
        p.join(20)
        if p.exitcode is None:
            print(f"# rank process {p.pid} did not exit in 20 s after its results; terminated", flush=True)
            p.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
