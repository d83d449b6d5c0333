"""Where a step's time goes on the device: busy, idle, and which kernels, from a torch.profiler trace.

``traced(seconds)`` profiles the whole process's CUDA activity (every thread: the engine loop's
kernels, graph replays, copies, and the runtime calls that wait) for ``seconds``; ``summary`` turns the
chrome trace into per-step numbers. A diagnosis tool: tracing adds its own overhead to the host side.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
WAITS = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaStreamWaitEvent")


def traced(seconds: float) -> dict[str, Any]:
    """Profile CUDA activity for ``seconds`` (this thread sleeps); returns the chrome trace's JSON."""
    import torch

    acts = [torch.profiler.ProfilerActivity.CUDA if torch.cuda.is_available() else torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:  # CPU: a smoke run (no device ops to summarize)
        time.sleep(seconds)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text())


def summary(trace: dict[str, Any], steps: int, top: int = 14) -> dict[str, Any]:
    """Per step (``steps`` the engine's step count inside the trace): device busy / idle time, idle gaps
    by size, host waits, and the kernels with the most device time (name, per step ms, launches per step)."""
    gpu: list[tuple[float, float, str]] = []
    waits: dict[str, float] = defaultdict(float)
    graph_launches = 0
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X":
            continue
        cat, name = ev.get("cat", ""), ev.get("name", "")
        if cat in GPU_CATS:
            gpu.append((float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0)), name))
        elif cat in ("cuda_runtime", "cuda_driver"):
            if name.startswith(WAITS):
                waits[name] += float(ev.get("dur", 0))
            if name.startswith("cudaGraphLaunch"):
                graph_launches += 1
    if not gpu or steps <= 0:
        return {"steps": steps, "kernels": 0}
    gpu.sort()
    t0, t1 = gpu[0][0], max(e for _, e, _ in gpu)
    busy, gaps = 0.0, []
    cur_s, cur_e = gpu[0][0], gpu[0][1]
    for s, e, _ in gpu[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for s, e, name in gpu:
        per_name[name][0] += e - s
        per_name[name][1] += 1
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    big = [g for g in gaps if g > 20.0]
    return {
        "steps": steps,
        "window_ms": (t1 - t0) / 1e3,
        "ms_per_step": (t1 - t0) / 1e3 / steps,
        "busy_ms_per_step": busy / 1e3 / steps,
        "idle_ms_per_step": (t1 - t0 - busy) / 1e3 / steps,
        "idle_gaps_over_20us_per_step": len(big) / steps,
        "idle_in_gaps_over_20us_ms_per_step": sum(big) / 1e3 / steps,
        "largest_idle_gaps_us": sorted(gaps)[-5:],
        "device_ops_per_step": len(gpu) / steps,
        "graph_launches_per_step": graph_launches / steps,
        "host_wait_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(waits.items())},
        "top": [(name[:90], t / 1e3 / steps, n / steps) for name, (t, n) in ranked],
    }


def print_summary(label: str, s: dict[str, Any]) -> None:
    if not s.get("kernels", 1):
        print(f"## {label}: no device activity traced")
        return
    print(f"## {label}: {s['steps']} steps in {s['window_ms']:.1f} ms = {s['ms_per_step']:.3f} ms/step; device busy "
          f"{s['busy_ms_per_step']:.3f}, idle {s['idle_ms_per_step']:.3f} ms/step ({s['idle_gaps_over_20us_per_step']:.2f} gaps "
          f"> 20 us holding {s['idle_in_gaps_over_20us_ms_per_step']:.3f} ms); {s['device_ops_per_step']:.1f} device ops and "
          f"{s['graph_launches_per_step']:.2f} graph launches per step; largest gaps us {[round(g) for g in s['largest_idle_gaps_us']]}")
    print(f"   host waits ms/step: {s['host_wait_ms_per_step']}")
    for name, ms, n in s["top"]:
        print(f"   {ms:8.4f} ms/step {n:6.2f}/step  {name}")
