"""Host cost of one engine step, without a GPU: the engine loop (scheduler, block bookkeeping,
token hand-out) and the hand-over of tokens to an asyncio event loop, against a runner that
returns at once.

On an H200 a 0.5B decode step of 64 rows is ~1.3 ms of device time (RESULTS.md); if the host
needs longer per step, the GPU waits. Prints host µs per step and tokens/s per batch size;
``--profile`` lists where the time goes (cProfile of the engine thread).

    python benchmarks/bench_host.py --batch 1 16 64 128 --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker_orcd.batching.loop import EngineLoop  # noqa: E402
from worker_orcd.batching.step import Sampled, StepBatch  # noqa: E402
from worker_orcd.engine.events import GenerationEnd, SamplingParams  # noqa: E402
from worker_orcd.http.stream import _handoff  # noqa: E402


class NullRunner:
    """Every sampling row draws one token (7): what is left is the host's work. With ``step_s`` the
    runner behaves as a GPU would: a launch returns at once, and its result is ready ``step_s``
    after the previous step's end or its own launch (whichever is later), waited for without
    the GIL (as a CUDA event wait)."""

    block_size = 16
    num_blocks = 65_536
    max_seq_len = 8192
    vocab_size = 1000

    def __init__(self, step_s: float = 0.0, token: int = 7) -> None:
        self.steps = 0
        self.token = token
        self.step_s = step_s
        self._device_free = 0.0  # when the simulated device finishes the queued work

    def step(self, batch: StepBatch) -> list[Sampled]:
        return self.launch(batch).result()

    def launch(self, batch: StepBatch) -> _Done:
        self.steps += 1
        self._device_free = max(self._device_free, time.perf_counter()) + self.step_s
        return _Done([Sampled(self.token)] * sum(1 for r in batch.rows if r.sample is not None), self._device_free)


class _Done:
    def __init__(self, out: list[Sampled], ready: float) -> None:
        self.out = out
        self.ready = ready

    def result(self) -> list[Sampled]:
        wait = self.ready - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self.out


class _Sink:
    """As http/stream.py's: tokens queue without a wake-up, the engine loop flushes once per step."""

    def __init__(self, handoff: object, queue: asyncio.Queue) -> None:  # type: ignore[type-arg]
        self._h, self._q = handoff, queue
        self.flush = handoff.wake_cb  # type: ignore[attr-defined]

    def __call__(self, item: object) -> None:
        self._h.post(self._q, item, hasattr(item, "stop_reason"))  # type: ignore[attr-defined]


class _WakingSink:
    """The hand-over before the per-step flush: one event-loop wake-up per token."""

    def __init__(self, handoff: object, queue: asyncio.Queue) -> None:  # type: ignore[type-arg]
        self._h, self._q = handoff, queue

    def __call__(self, item: object) -> None:
        self._h.post(self._q, item, True)  # type: ignore[attr-defined]


def run(batch: int, tokens: int, prompt: int, profile: bool, step_ms: float = 0.0,
        consumer_us: float = 0.0, per_token: bool = False) -> dict[str, float]:
    aloop = asyncio.new_event_loop()
    t = threading.Thread(target=aloop.run_forever, daemon=True)
    t.start()
    runner = NullRunner(step_ms / 1e3)
    gaps: list[float] = []
    loop = EngineLoop(runner, max_batch=batch, token_budget=max(512, batch))
    done = threading.Event()
    left = [batch]
    received = [0]

    async def consume(q: asyncio.Queue) -> None:  # type: ignore[type-arg]
        last = None
        while True:
            item = await q.get()
            if isinstance(item, GenerationEnd):
                left[0] -= 1
                if left[0] == 0:
                    done.set()
                return
            received[0] += 1
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            if consumer_us:  # the stream's own work per token (SSE framing, the socket write)
                end = now + consumer_us / 1e6
                while time.perf_counter() < end:
                    json.dumps({"t": " token", "i": received[0]})

    queues = []
    for _ in range(batch):
        q: asyncio.Queue = asyncio.Queue()  # type: ignore[type-arg]
        queues.append(q)
        asyncio.run_coroutine_threadsafe(consume(q), aloop)
    prof = cProfile.Profile() if profile else None
    if prof is not None:  # profile the engine thread: enabled from inside it, at its first launch
        inner, started = runner.launch, [False]

        def launch(b: StepBatch) -> _Done:
            if not started[0]:
                started[0] = True
                prof.enable()
            return inner(b)

        runner.launch = launch  # type: ignore[method-assign]
    t0 = time.perf_counter()
    h = _handoff(aloop)
    for q in queues:
        sink = _WakingSink(h, q) if per_token else _Sink(h, q)
        loop.submit_to(list(range(1, prompt + 1)), SamplingParams(max_tokens=tokens), None, sink)
    done.wait(120)
    wall = time.perf_counter() - t0
    loop.close()  # joins the engine thread: its profile is complete
    aloop.call_soon_threadsafe(aloop.stop)
    steps = runner.steps
    gaps.sort()
    r = {"batch": batch, "steps": steps, "us_per_step": wall / steps * 1e6, "tok_s": received[0] / wall,
         "received": received[0], "itl_p50_ms": gaps[len(gaps) // 2] * 1e3 if gaps else 0.0,
         "itl_p99_ms": gaps[int(len(gaps) * 0.99)] * 1e3 if gaps else 0.0}
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64, 128])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--step-ms", type=float, default=0.0, help="simulated device time per step")
    ap.add_argument("--consumer-us", type=float, default=0.0, help="event-loop work per token (busy)")
    ap.add_argument("--wake-per-token", action="store_true", help="the old hand-over: a wake-up per token")
    ap.add_argument("--switch-ms", type=float, default=None, help="sys.setswitchinterval (default: CPython's)")
    args = ap.parse_args()
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1e3)
    print(f"step {args.step_ms} ms, consumer {args.consumer_us} µs/token, "
          f"{'a wake-up per token' if args.wake_per_token else 'one wake-up per step'}, GIL switch "
          f"{sys.getswitchinterval() * 1e3:g} ms")
    print("| batch | steps | µs / step | tokens/s handed to the event loop | gap p50 / p99 ms |")
    print("|---:|---:|---:|---:|---|")
    for b in args.batch:
        r = run(b, args.tokens, args.prompt, args.profile, args.step_ms, args.consumer_us, args.wake_per_token)
        print(f"| {r['batch']} | {r['steps']} | {r['us_per_step']:.0f} | {r['tok_s']:,.0f} | "
              f"{r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
