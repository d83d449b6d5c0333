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
    """Every sampling row draws token 7 at once: what is left is the host's work."""

    block_size = 16
    num_blocks = 65_536
    max_seq_len = 8192
    vocab_size = 1000

    def __init__(self) -> None:
        self.steps = 0

    def step(self, batch: StepBatch) -> list[Sampled]:
        return self.launch(batch).result()

    def launch(self, batch: StepBatch) -> _Done:
        self.steps += 1
        return _Done([Sampled(7)] * sum(1 for r in batch.rows if r.sample is not None))


class _Done:
    def __init__(self, out: list[Sampled]) -> None:
        self.out = out

    def result(self) -> list[Sampled]:
        return self.out


class _Sink:
    """As http/stream.py's: tokens queue without a wake-up, the engine loop flushes once per step."""

    def __init__(self, handoff: object, queue: asyncio.Queue) -> None:  # type: ignore[type-arg]
        self._h, self._q = handoff, queue
        self.flush = handoff.wake_cb  # type: ignore[attr-defined]

    def __call__(self, item: object) -> None:
        self._h.post(self._q, item, not isinstance(item, Sampled) and hasattr(item, "stop_reason"))  # type: ignore[attr-defined]


def run(batch: int, tokens: int, prompt: int, profile: bool) -> dict[str, float]:
    aloop = asyncio.new_event_loop()
    t = threading.Thread(target=aloop.run_forever, daemon=True)
    t.start()
    runner = NullRunner()
    loop = EngineLoop(runner, max_batch=batch, token_budget=max(512, batch))
    done = threading.Event()
    left = [batch]
    received = [0]

    async def consume(q: asyncio.Queue) -> None:  # type: ignore[type-arg]
        while True:
            item = await q.get()
            if isinstance(item, GenerationEnd):
                left[0] -= 1
                if left[0] == 0:
                    done.set()
                return
            received[0] += 1

    queues = []
    for _ in range(batch):
        q: asyncio.Queue = asyncio.Queue()  # type: ignore[type-arg]
        queues.append(q)
        asyncio.run_coroutine_threadsafe(consume(q), aloop)
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        threading.setprofile(lambda *a: None)
    t0 = time.perf_counter()
    h = _handoff(aloop)
    for q in queues:
        loop.submit_to(list(range(1, prompt + 1)), SamplingParams(max_tokens=tokens), None, _Sink(h, q))
    if prof is not None:
        # profile the engine thread: enable from inside it at its next step
        prof.enable()
    done.wait(120)
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
    loop.close()
    aloop.call_soon_threadsafe(aloop.stop)
    steps = runner.steps
    r = {"batch": batch, "steps": steps, "us_per_step": wall / steps * 1e6, "tok_s": received[0] / wall,
         "received": received[0]}
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64, 128])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print("| batch | steps | host µs / step | tokens/s handed to the event loop |")
    print("|---:|---:|---:|---:|")
    for b in args.batch:
        r = run(b, args.tokens, args.prompt, args.profile)
        print(f"| {r['batch']} | {r['steps']} | {r['us_per_step']:.0f} | {r['tok_s']:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
