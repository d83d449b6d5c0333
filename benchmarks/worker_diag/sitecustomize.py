"""Diagnostics for the served worker process only (``python -m worker_orcd serve``), set by environment.

Put this directory first on PYTHONPATH of a bench_load run (benchmarks/run_h200.sh spy13/direct13/gc13/final13/
gcab13); other processes (the engine process, the load generator) are left alone:

    SWITCH_MS=0.25        sys.setswitchinterval in ms
    USE_UVLOOP=1          uvloop's event loop policy (before ``--event-loop`` existed)
    GC_T=700,10,100       gc.set_threshold (GC_T=off: gc.disable)
    GC_LOG=path.json      every collection pause > 1 ms: (seconds since start, generation, ms, collected), rewritten each second
"""

import gc
import json
import os
import sys
import time

_argv = getattr(sys, "orig_argv", [])
if "worker_orcd" in _argv and "serve" in _argv:
    if os.environ.get("SWITCH_MS"):
        sys.setswitchinterval(float(os.environ["SWITCH_MS"]) / 1e3)
    if os.environ.get("USE_UVLOOP"):
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if os.environ.get("GC_T") == "off":
        gc.disable()
    elif os.environ.get("GC_T"):
        gc.set_threshold(*map(int, os.environ["GC_T"].split(",")))
    if os.environ.get("GC_LOG"):
        _t0 = time.monotonic()
        _t = [0.0, 0.0]
        _pauses: list[tuple[float, int, float, int]] = []

        def _on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                _t[0] = time.perf_counter()
                return
            ms = (time.perf_counter() - _t[0]) * 1e3
            if ms > 1.0:
                _pauses.append((round(time.monotonic() - _t0, 3), info["generation"], round(ms, 2), info["collected"]))
            if time.monotonic() - _t[1] > 1:
                _t[1] = time.monotonic()
                with open(os.environ["GC_LOG"], "w") as f:
                    json.dump({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(), "pauses": _pauses}, f)

        gc.callbacks.append(_on_gc)
