"""The batching engine's host side (no torch): block manager, scheduler and engine loop.

The loop runs against a tiny deterministic runner written here: its "model"
makes the next token a function of the whole sequence so far, so any lost,
duplicated or reordered token, or a recomputation that reads the wrong KV
blocks, changes every later token.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence as Seq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_orcd.batching.block_manager import BlockManager
from worker_orcd.batching.loop import EngineLoop
from worker_orcd.batching.scheduler import Scheduler
from worker_orcd.batching.sequence import Sequence, SeqStatus
from worker_orcd.batching.step import PENDING, Sampled, StepBatch
from worker_orcd.engine.events import GenerationEnd, SamplingParams, TokenEvent
from worker_orcd.errors import ErrorCode, WorkerError

VOCAB = 1000


@dataclasses.dataclass
class Done:
    out: list[Sampled]

    def result(self) -> list[Sampled]:
        return self.out


class HashRunner:
    """A 'model' whose KV cache is real bookkeeping: each block slot stores the token computed there.

    The next token is a hash of every token read back through the block table, so a row that
    reads a block it does not own, or that is missing a position, produces another stream.
    """

    def __init__(self, num_blocks: int = 64, block_size: int = 4, max_seq_len: int = 256, delay: float = 0.0) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_seq_len = max_seq_len
        self.vocab_size = VOCAB
        self.kv: dict[tuple[int, int], int] = {}
        self.delay = delay
        self.steps: list[StepBatch] = []
        self.fail_with: BaseException | None = None
        self.prev: dict[int, int] = {}  # seq_id -> token the previous launch drew (PENDING inputs)
        self.resolved = 0
        self.resolved_steps: set[int] = set()  # indices in steps of launches that read PENDING tokens

    def launch(self, batch: StepBatch) -> "Done":
        rows = []
        for row in batch.rows:
            if row.tokens[-1] == PENDING:
                row = dataclasses.replace(row, tokens=row.tokens[:-1] + (self.prev[row.seq_id],))
                self.resolved += 1
                self.resolved_steps.add(len(self.steps))
            assert PENDING not in row.tokens
            rows.append(row)
        out = self.step(StepBatch(tuple(rows)))
        self.prev = {r.seq_id: o.token_id for r, o in zip([r for r in rows if r.sample is not None], out, strict=True)}
        return Done(out)

    def step(self, batch: StepBatch) -> list[Sampled]:
        if self.fail_with is not None:
            raise self.fail_with
        self.steps.append(batch)
        if self.delay:
            time.sleep(self.delay)
        out = []
        for row in batch.rows:
            for i, t in enumerate(row.tokens):
                p = row.start + i
                self.kv[(row.block_table[p // self.block_size], p % self.block_size)] = t
            if row.sample is None:
                continue
            n = row.start + len(row.tokens)
            seq = [self.kv[(row.block_table[p // self.block_size], p % self.block_size)] for p in range(n)]
            h = 17
            for t in seq:
                h = (h * 31 + t) % 1_000_003
            h = (h + row.sample.step * 7 + row.sample.params.seed) % VOCAB
            out.append(Sampled(h))
        return out


def expected_stream(prompt: Seq[int], params: SamplingParams) -> list[int]:
    seq = list(prompt)
    out: list[int] = []
    for step in range(params.max_tokens):
        h = 17
        for t in seq:
            h = (h * 31 + t) % 1_000_003
        tok = (h + step * 7 + params.seed) % VOCAB
        out.append(tok)
        seq.append(tok)
        if tok in params.stop_ids:
            break
    return out


def drain(it) -> tuple[list[int], GenerationEnd]:
    toks, end = [], None
    for e in it:
        if isinstance(e, TokenEvent):
            assert e.index == len(toks), "token indices must be consecutive from 0"
            toks.append(e.token_id)
        else:
            end = e
    assert isinstance(end, GenerationEnd)
    return toks, end


# --- block manager ---------------------------------------------------------------------------


def test_block_manager_grows_lazily_and_frees_everything() -> None:
    bm = BlockManager(8, 4)
    s = Sequence([1, 2, 3, 4, 5], SamplingParams(max_tokens=3))
    assert bm.needed(s, 5) == 2
    bm.grow(s, 5)
    assert s.block_table == [0, 1] and bm.num_free == 6
    s.num_computed = 5
    assert bm.needed(s, 3) == 0  # positions 5..7 fit the second block
    assert bm.needed(s, 4) == 1
    bm.free(s)
    assert bm.num_free == 8 and s.block_table == []
    bm.check()


def test_block_manager_refuses_overcommit() -> None:
    bm = BlockManager(2, 4)
    s = Sequence(list(range(9)), SamplingParams(max_tokens=1))
    assert not bm.can_grow(s, 9)
    with pytest.raises(RuntimeError, match="needs 3 KV blocks, 2 free"):
        bm.grow(s, 9)
    assert bm.num_free == 2 and s.block_table == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "finish", "preempt"]), st.integers(0, 50)), max_size=80))
def test_scheduler_never_leaks_or_double_allocates_blocks(ops: list[tuple[str, int]]) -> None:
    bm = BlockManager(12, 4)
    sched = Scheduler(bm, max_batch=4, token_budget=10)
    live: list[Sequence] = []
    for op, x in ops:
        if op == "add":
            s = Sequence(list(range(1 + x % 20)), SamplingParams(max_tokens=1 + x % 7))
            sched.add(s)
            live.append(s)
        elif op == "step":
            batch, seqs = sched.schedule()
            assert batch.num_tokens <= sched.token_budget
            assert len(sched.running) <= sched.max_batch
            for row, s in zip(batch.rows, seqs, strict=True):
                assert s.status is SeqStatus.RUNNING
                assert row.start == s.num_computed
                assert len(s.block_table) * bm.block_size >= row.start + len(row.tokens)
                s.num_computed += len(row.tokens)
                if row.sample is not None:
                    s.output.append(x)
                    if len(s.output) >= s.params.max_tokens:
                        sched.finish(s, "max_tokens")
        elif op == "finish" and live:
            sched.finish(live[x % len(live)], "cancelled")
        elif op == "preempt" and sched.running:
            sched.preempt(sched.running[x % len(sched.running)])
        bm.check()
        owned = [b for s in sched.running for b in s.block_table]
        assert len(owned) == len(set(owned)) == bm.num_used, "running sequences own exactly the used blocks"
        assert all(not s.block_table for s in sched.waiting)


def test_scheduler_chunks_prompts_and_keeps_decodes_running() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch=4, token_budget=8)
    a = Sequence([1, 2, 3], SamplingParams(max_tokens=5))
    sched.add(a)
    batch, _ = sched.schedule()
    assert [len(r.tokens) for r in batch.rows] == [3] and batch.rows[0].sample is not None
    a.num_computed = 3
    a.output.append(9)
    b = Sequence(list(range(20)), SamplingParams(max_tokens=5))
    sched.add(b)
    batch, seqs = sched.schedule()
    # a's decode row first, then 7 tokens (the rest of the budget) of b's prompt, no sample for b yet
    assert seqs == [a, b]
    assert [len(r.tokens) for r in batch.rows] == [1, 7]
    assert batch.rows[1].sample is None and batch.rows[1].start == 0


def test_scheduler_caps_steps_that_carry_decode_rows_at_the_mixed_budget() -> None:
    """With a stream decoding, a step holds at most mixed_budget tokens (prompt chunks wait);
    prefill alone takes the whole token_budget; never fewer tokens than decode rows."""
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch=4, token_budget=16, mixed_budget=6)
    b = Sequence(list(range(40)), SamplingParams(max_tokens=5))
    sched.add(b)
    batch, _ = sched.schedule()
    assert batch.num_tokens == 16, "prefill alone: the full token budget"
    b.num_computed = 16
    a = Sequence(list(range(30)), SamplingParams(max_tokens=5))
    sched.add(a)
    batch, _ = sched.schedule()
    assert [len(r.tokens) for r in batch.rows] == [16], "b still prefills: no decode row, full budget"
    b.num_computed = 32
    batch, _ = sched.schedule()  # b's last 8 prompt tokens, then a's first chunk
    assert [len(r.tokens) for r in batch.rows] == [8, 8]
    b.num_computed, a.num_computed = 40, 8
    b.output.append(1)
    batch, seqs = sched.schedule()
    assert seqs == [b, a] and [len(r.tokens) for r in batch.rows] == [1, 5], "b decodes: 6 tokens in all"
    assert Scheduler(bm, max_batch=4, token_budget=16, mixed_budget=40).mixed_budget == 16
    with pytest.raises(ValueError, match="mixed_budget"):
        Scheduler(bm, max_batch=4, token_budget=16, mixed_budget=0)


def test_scheduler_preempts_the_youngest() -> None:
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_batch=4, token_budget=64)
    old, young = Sequence([1, 2, 3, 4], SamplingParams(max_tokens=8)), Sequence([5, 6, 7, 8], SamplingParams(max_tokens=8))
    sched.add(old)
    sched.add(young)
    sched.schedule()
    for s in (old, young):
        s.num_computed = 4
        s.output.append(1)
    sched.schedule()  # old takes the third block for position 4; young needs one too: none left -> young preempted
    assert young.status is SeqStatus.WAITING and young.num_computed == 0 and young.preemptions == 1
    assert sched.waiting[0] is young and old.status is SeqStatus.RUNNING
    bm.check()


# --- the engine loop -------------------------------------------------------------------------


def test_loop_streams_match_the_lone_run_under_concurrency_and_preemption() -> None:
    runner = HashRunner(num_blocks=10, block_size=4, max_seq_len=40, delay=0.002)
    loop = EngineLoop(runner, max_batch=4, token_budget=6)
    jobs = [([i + 1] * (3 + 4 * i), SamplingParams(max_tokens=12 + i, seed=i)) for i in range(6)]
    results: dict[int, tuple[list[int], GenerationEnd]] = {}
    streams = [loop.submit(*job) for job in jobs]  # all queued before any finishes: they must share 10 blocks

    def run(i: int) -> None:
        results[i] = drain(streams[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    loop.close()
    for i, (prompt, params) in enumerate(jobs):
        toks, end = results[i]
        assert toks == expected_stream(prompt, params), f"job {i}"
        assert end.stop_reason == "max_tokens" and end.tokens_out == len(toks)
    assert loop.scheduler.preemptions > 0, "the KV budget was meant to force preemption"
    assert any(len(r.tokens) > 1 and r.start > 0 for b in runner.steps for r in b.rows), "prompts were chunked"
    assert runner.resolved > 0, "steps were meant to overlap (rows reading the previous step's tokens)"
    loop.blocks.check()
    assert loop.blocks.num_used == 0


@pytest.mark.parametrize("overlap", [True, False], ids=["greedy-overlaps", "penalty-waits"])
def test_loop_overlaps_steps_only_without_host_state(overlap: bool) -> None:
    """Host-free jobs queue step N+1 before step N's tokens are read (a stop at N costs one dropped
    row in N+1, never a delivered token); a penalty job makes every step wait for the previous one.
    Either way each stream is the lone stream, cut at its stop id or max_tokens."""
    runner = HashRunner(delay=0.001)
    loop = EngineLoop(runner, max_batch=4, token_budget=64)
    penalty = {} if overlap else {"repetition_penalty": 1.3}
    base = [expected_stream([5, 6, 7], SamplingParams(max_tokens=30, seed=s)) for s in range(3)]
    jobs = [([5, 6, 7], SamplingParams(max_tokens=30, seed=0, stop_ids=(base[0][9],), **penalty)),
            ([5, 6, 7], SamplingParams(max_tokens=17, seed=1)),
            ([5, 6, 7], SamplingParams(max_tokens=30, seed=2))]
    streams = [loop.submit(*j) for j in jobs]
    results = [drain(s) for s in streams]
    loop.close()
    for (prompt, params), (toks, end) in zip(jobs, results, strict=True):
        assert toks == expected_stream(prompt, dataclasses.replace(params, repetition_penalty=1.0))
        assert end.tokens_out == len(toks)
    assert results[0][1].stop_reason == "eos" and results[1][1].stop_reason == "max_tokens"
    first = min(r.seq_id for b in runner.steps for r in b.rows)  # job 0, submitted first
    with_first = [i for i, b in enumerate(runner.steps) if any(r.seq_id == first for r in b.rows)]
    overlapped = [i for i in with_first if i in runner.resolved_steps]
    assert bool(overlapped) is overlap, (with_first, runner.resolved_steps)
    assert runner.resolved_steps, "host-free jobs overlap (after job 0 ends, in the penalty case)"
    loop.blocks.check()
    assert loop.blocks.num_used == 0


def test_loop_flushes_each_consumer_once_per_step_after_its_deliveries() -> None:
    """Sinks sharing one ``flush`` (streams on one event loop) get it called once per step that
    delivered to them, after those deliveries: nothing is left waiting for a wake-up."""
    runner = HashRunner(delay=0.001)
    loop = EngineLoop(runner, max_batch=4, token_budget=64)
    log: list[object] = []
    done = threading.Event()

    class Sink:
        def __init__(self, name: str) -> None:
            self.name = name
            self.flush = flush

        def __call__(self, item: object) -> None:
            log.append((self.name, item))
            if isinstance(item, GenerationEnd) and sum(isinstance(x, tuple) and isinstance(x[1], GenerationEnd)
                                                       for x in log) == 2:
                done.set()

    def flush() -> None:
        log.append("flush")

    for name in ("a", "b"):
        loop.submit_to([1, 2, 3], SamplingParams(max_tokens=6, seed=len(name)), None, Sink(name))
    assert done.wait(10)
    time.sleep(0.05)
    loop.close()
    assert log[-1] == "flush", "the last deliveries were flushed"
    assert all(not (x == "flush" and y == "flush") for x, y in zip(log, log[1:])), "a flush only after deliveries"
    tokens = [x for x in log if isinstance(x, tuple) and isinstance(x[1], TokenEvent)]
    assert len(tokens) == 12 and log.count("flush") <= 7, "one flush per step for both streams, not per token"


def test_loop_stop_ids_and_capacity() -> None:
    runner = HashRunner()
    loop = EngineLoop(runner, max_batch=2, token_budget=16)
    p = SamplingParams(max_tokens=50, seed=3)
    full = expected_stream([5, 6], p)
    stop = full[4]
    toks, end = drain(loop.submit([5, 6], SamplingParams(max_tokens=50, seed=3, stop_ids=frozenset({stop}))))
    assert toks == full[: full.index(stop) + 1] and end.stop_reason == "eos"
    with pytest.raises(WorkerError) as e:
        loop.submit([1] * 200, SamplingParams(max_tokens=100))
    assert e.value.code == ErrorCode.INVALID_PARAMS
    loop.close()


def test_loop_cancel_stops_within_a_step_and_others_continue() -> None:
    runner = HashRunner(delay=0.01)
    loop = EngineLoop(runner, max_batch=4, token_budget=64)
    cancel = threading.Event()
    victim = loop.submit([1, 2], SamplingParams(max_tokens=250), cancel)
    other_params = SamplingParams(max_tokens=30, seed=1)
    other = loop.submit([3, 4], other_params)
    first = next(victim)
    assert isinstance(first, TokenEvent)
    cancel.set()
    t0 = time.monotonic()
    rest = list(victim)
    assert time.monotonic() - t0 < 1.0
    assert isinstance(rest[-1], GenerationEnd) and rest[-1].stop_reason == "cancelled"
    toks, end = drain(other)
    assert toks == expected_stream([3, 4], other_params) and end.stop_reason == "max_tokens"
    loop.close()


def test_loop_abandoned_iterator_frees_its_blocks() -> None:
    runner = HashRunner(delay=0.005)
    loop = EngineLoop(runner, max_batch=2, token_budget=64)
    it = loop.submit([1, 2, 3], SamplingParams(max_tokens=250))
    next(it)
    it.close()  # the consumer went away without cancelling
    deadline = time.monotonic() + 2
    while loop.blocks.num_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.blocks.num_used == 0 and not loop.scheduler.has_work
    loop.close()


def test_loop_runner_failure_reaches_every_job_and_later_submits() -> None:
    runner = HashRunner(delay=0.01)
    loop = EngineLoop(runner, max_batch=4, token_budget=64)
    a = loop.submit([1], SamplingParams(max_tokens=100))
    next(a)
    runner.fail_with = WorkerError("device fell over", code=ErrorCode.CUDA_ERROR)
    with pytest.raises(WorkerError) as e:
        list(a)
    assert e.value.code == ErrorCode.CUDA_ERROR
    with pytest.raises(WorkerError):
        loop.submit([1], SamplingParams(max_tokens=1))


def test_loop_seal_check_once_per_admitting_step() -> None:
    """A burst of arrivals admitted together costs one seal check that covers all of them."""
    calls: list[int] = []
    loop = EngineLoop(HashRunner(), max_batch=8, token_budget=64, before_admit=lambda n, beside_steps: calls.append(n))
    with loop._cv:  # hold the loop: all four are in its inbox before it looks (the lock is re-entrant)
        streams = [loop.submit([i + 1, 2], SamplingParams(max_tokens=3)) for i in range(4)]
    out = [drain(s)[0] for s in streams]
    later = drain(loop.submit([9, 9], SamplingParams(max_tokens=2)))[0]  # a later arrival: its own check
    loop.close()
    assert len(out) == 4 and len(later) == 2
    assert calls == [4, 1]


class DeviceCheck:
    """A seal check as the engine starts it: computed 'on the device' until ``finish`` is set."""

    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail
        self.finish = threading.Event()

    def ready(self) -> bool:
        return self.finish.is_set()

    def __call__(self) -> None:
        self.finish.wait(5)
        self.log.append(f"checked {self.name}")
        if self.fail:
            raise WorkerError("seal mismatch", code=ErrorCode.SEAL_VERIFICATION_FAILED)


def test_loop_running_jobs_never_wait_for_a_seal_check() -> None:
    """A check started for an arrival runs beside the running job's steps: that job keeps getting
    tokens while the check is not ready, and the arrival is admitted only once it passed."""
    log: list[str] = []
    checks: list[DeviceCheck] = []

    def start(n: int, *, beside_steps: bool) -> DeviceCheck:
        checks.append(DeviceCheck(log, f"#{len(checks)} of {n}"))
        log.append(f"start {checks[-1].name}")
        if len(checks) == 1:
            checks[0].finish.set()  # the first job: nothing else runs, the loop waits for it
        return checks[-1]

    runner = HashRunner(delay=0.002)
    loop = EngineLoop(runner, max_batch=4, token_budget=64, before_admit=start)
    running = loop.submit([1, 2], SamplingParams(max_tokens=200))
    next(running)
    late = loop.submit([7, 8, 9], SamplingParams(max_tokens=3))
    for _ in range(30):  # thirty more tokens of the running job while the late job's check is not ready
        assert isinstance(next(running), TokenEvent)
    assert len(checks) == 2 and not any(r.tokens[:3] == (7, 8, 9) for b in runner.steps for r in b.rows)
    checks[1].finish.set()
    late_tokens = [e for e in late if isinstance(e, TokenEvent)]
    loop.close()
    assert len(late_tokens) == 3
    assert log == ["start #0 of 1", "checked #0 of 1", "start #1 of 1", "checked #1 of 1"]
    alone = EngineLoop(HashRunner(), max_batch=1, token_budget=64)
    assert [e.token_id for e in late_tokens] == drain(alone.submit([7, 8, 9], SamplingParams(max_tokens=3)))[0]
    alone.close()


def test_loop_arrival_during_a_check_waits_for_its_own() -> None:
    """A check covers only the jobs that arrived before it started: a job arriving while it runs is
    not admitted by it, but by the next one."""
    log: list[str] = []
    checks: list[DeviceCheck] = []

    def start(n: int, *, beside_steps: bool) -> DeviceCheck:
        checks.append(DeviceCheck(log, f"#{len(checks)} of {n}"))
        if len(checks) == 1:
            checks[0].finish.set()
        return checks[-1]

    loop = EngineLoop(HashRunner(delay=0.002), max_batch=4, token_budget=64, before_admit=start)
    running = loop.submit([1], SamplingParams(max_tokens=200))
    next(running)
    a = loop.submit([3, 3], SamplingParams(max_tokens=2))
    deadline = time.monotonic() + 5
    while len(checks) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    b = loop.submit([4, 4], SamplingParams(max_tokens=2))  # arrives while check #1 (a's) is in flight
    time.sleep(0.05)
    assert len(checks) == 2
    checks[1].finish.set()
    assert len(drain(a)[0]) == 2
    while len(checks) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(checks) == 3, "b needs a check of its own"
    checks[2].finish.set()
    assert len(drain(b)[0]) == 2
    loop.close()


def test_loop_failed_seal_check_fails_what_it_covered_then_everything() -> None:
    """A check that finds the weights changed: the jobs it covered get SEAL_VERIFICATION_FAILED and
    no token; the running job fails too and the loop takes no more jobs (fatal, 4122)."""
    log: list[str] = []
    checks: list[DeviceCheck] = []

    def start(n: int, *, beside_steps: bool) -> DeviceCheck:
        checks.append(DeviceCheck(log, str(len(checks)), fail=len(checks) == 1))
        checks[-1].finish.set()
        return checks[-1]

    loop = EngineLoop(HashRunner(delay=0.005), max_batch=4, token_budget=64, before_admit=start)
    running = loop.submit([1], SamplingParams(max_tokens=200))
    next(running)
    late = loop.submit([5, 6], SamplingParams(max_tokens=5))
    with pytest.raises(WorkerError) as e:
        next(late)
    assert e.value.code == ErrorCode.SEAL_VERIFICATION_FAILED
    with pytest.raises(WorkerError) as e2:
        for _ in running:
            pass
    assert e2.value.code == ErrorCode.SEAL_VERIFICATION_FAILED
    with pytest.raises(WorkerError):
        loop.submit([1], SamplingParams(max_tokens=1))


def test_loop_plain_callable_check_runs_before_the_job_is_admitted() -> None:
    """A hook that returns a plain callable (the check's second half, no ``ready``): it runs before
    the job it covers is scheduled, once."""
    events: list[str] = []

    def start(n: int, *, beside_steps: bool):  # noqa: ANN202
        events.append(f"start {n}")
        return lambda: events.append("check")

    runner = HashRunner()
    loop = EngineLoop(runner, max_batch=4, token_budget=64, before_admit=start)
    stream = loop.submit([1, 2], SamplingParams(max_tokens=3))
    first = next(stream)
    events.append(f"token {first.index}")
    rest = [e for e in stream if isinstance(e, TokenEvent)]
    loop.close()
    assert [e.index for e in rest] == [1, 2]
    assert events[:3] == ["start 1", "check", "token 0"]
    assert events.count("check") == 1


def test_loop_seal_failure_fails_the_admitted_jobs() -> None:
    def bad(n: int, *, beside_steps: bool) -> None:
        raise WorkerError("seal mismatch", code=ErrorCode.SEAL_VERIFICATION_FAILED)

    loop = EngineLoop(HashRunner(), max_batch=2, token_budget=16, before_admit=bad)
    with pytest.raises(WorkerError) as e:
        list(loop.submit([1, 2], SamplingParams(max_tokens=3)))
    assert e.value.code == ErrorCode.SEAL_VERIFICATION_FAILED


def test_loop_reports_the_gap_between_consecutive_hand_outs() -> None:
    """The observer hears the engine-side inter-token gap of each step after the first of a run of
    steps (the step interval histogram), and none for the first step after the loop was idle."""
    seen: list[float | None] = []

    class Obs:
        def step(self, rows, tokens, running, waiting, used, total, interval_ms=None) -> None:  # noqa: ANN001
            seen.append(interval_ms)

        def admitted(self, queue_ms: float) -> None:
            pass

        def preempted(self) -> None:
            pass

    loop = EngineLoop(HashRunner(delay=0.004), max_batch=4, token_budget=64, observer=Obs())
    drain(loop.submit([1, 2], SamplingParams(max_tokens=6)))
    first_run = list(seen)
    deadline = time.monotonic() + 5
    while loop.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.1)  # idle: the next job's first gap must not include this
    drain(loop.submit([3], SamplingParams(max_tokens=3)))
    loop.close()
    assert first_run[0] is None and len(first_run) >= 6
    gaps = [g for g in first_run[1:] if g is not None]
    # the runner's 4 ms steps (an overlapped launch can make one gap short: its step ran inside launch)
    assert sum(g >= 3.0 for g in gaps) >= 3 and all(g < 1000 for g in gaps), gaps
    second = seen[len(first_run):]
    assert second[0] is None, second  # not the 100 ms the loop sat idle


def test_loop_seal_checks_start_at_most_once_per_interval_while_jobs_run() -> None:
    """With an interval, arrivals while a job runs share one check that starts no sooner than the
    interval after the previous one; a lone arrival with nothing running is checked at once."""
    starts: list[float] = []
    beside: list[bool] = []

    def start(n: int, *, beside_steps: bool) -> None:
        starts.append(time.monotonic())
        beside.append(beside_steps)

    loop = EngineLoop(HashRunner(delay=0.004), max_batch=8, token_budget=64, before_admit=start,
                      seal_check_interval_s=0.5)
    t0 = time.monotonic()
    running = loop.submit([1], SamplingParams(max_tokens=200))  # >= 0.8 s of 4 ms steps
    next(running)
    assert starts[0] - t0 < 0.4, "nothing was running: the first check starts at once"
    late = [loop.submit([i + 2, 5], SamplingParams(max_tokens=2)) for i in range(3)]
    for s in late:
        time.sleep(0.01)
        assert len(drain(s)[0]) == 2
    loop.close()
    assert len(starts) == 2, starts  # the three arrivals: one check
    assert starts[1] - starts[0] >= 0.5
    assert beside == [False, True]  # alone: full speed; beside the running job's steps: a bounded share
