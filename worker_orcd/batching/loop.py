"""The engine loop: one thread that schedules a step, runs it on the model runner and hands out tokens.

Jobs enter through ``submit()`` from any thread and read their events from a
per-job queue, so the blocking-iterator contract of ``ResidentLike.generate``
is unchanged and many jobs run at once. Between two steps (a decode step, or
one prefill chunk) the loop looks at every job's cancel flag: a cancel,
disconnect, timeout or shutdown takes effect within one step, also during a
long prefill. A preempted job is recomputed from its prompt plus the tokens
it already produced; only tokens sampled after that are delivered, so its
stream has no gap and no duplicate.

Overlap: while every running job samples without host state (no grammar, no
penalties), the loop queues step N+1 before it reads step N's tokens
(``StepRunner.launch``; the rows read their unknown last token on the device),
so scheduling, delivery and the HTTP side run while the GPU computes. A job
that stops at step N (EOS, stop id, cancel) has one more row computed in
N+1, whose token is dropped; a job at ``max_tokens`` is not scheduled again.
Otherwise the loop waits for each step before it schedules the next.

Seal checks (SPEC 4121): a job is admitted only after a seal check that started after it arrived
has passed. The loop starts one check for every job waiting unchecked (a burst of arrivals costs
one fingerprint), lets the running jobs' steps go on while the device computes it beside them, and
admits the jobs it covers at the first step boundary after it passed: no step of a running job
waits for a check, and a failed check fails the jobs it covered, then every job (fatal, 4122).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence as Seq
from dataclasses import dataclass
from typing import Any, Protocol

from ..engine.events import GenerationEnd, SamplingParams, TokenEvent
from ..errors import ErrorCode, WorkerError
from .block_manager import BlockManager
from .scheduler import Scheduler
from .sequence import Sequence, SeqStatus
from .step import PENDING, PendingStep, StepBatch, StepRunner

log = logging.getLogger("worker_orcd.batching")

Cancel = threading.Event | Callable[[], bool] | None
IDLE_POLL_S = 0.05  # how often an idle loop looks at cancel flags of queued jobs


def _is_set(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


class LoopObserver(Protocol):
    """Telemetry hooks (metrics.py implements them); called on the loop thread, must be cheap."""

    def step(self, rows: int, tokens: int, running: int, waiting: int, blocks_used: int, blocks_total: int,
             interval_ms: float | None = None) -> None:
        """After each step; ``interval_ms``: since the previous step's hand-out, when both handed out tokens."""
        ...
    def admitted(self, queue_ms: float) -> None: ...
    def preempted(self) -> None: ...


class SealCheck(Protocol):
    """A seal check started on the device (``residency.PendingSealCheck``)."""

    def ready(self) -> bool:
        """Whether its fingerprint is computed, without waiting."""
        ...

    def __call__(self) -> None:
        """Wait for it and compare; raises WorkerError (SEAL_VERIFICATION_FAILED) on a mismatch."""
        ...


class BeforeAdmit(Protocol):
    """The host's seal-check hook: called with the number of jobs a check covers and whether it runs
    beside running jobs' steps (else nothing runs and the loop waits for it: check at full speed).
    Returns None (it checked them already), a SealCheck, or a plain callable (the check's second
    half, run when the loop next looks)."""

    def __call__(self, jobs: int, *, beside_steps: bool) -> SealCheck | Callable[[], None] | None: ...

Sink = Callable[[Any], None]


@dataclass
class _Job:
    seq: Sequence
    events: queue.SimpleQueue[Any]
    cancel: Cancel
    abandoned: threading.Event
    t_submit: float
    t_first: float | None = None
    t_prefill_done: float | None = None
    sink: Sink | None = None  # called on the engine thread instead of queueing (no reader thread per job)
    flush: Callable[[], None] | None = None  # the sink's ``flush``: called once after a step's deliveries

    def cancelled(self) -> bool:
        return self.abandoned.is_set() or _is_set(self.cancel)

    def deliver(self, item: Any) -> None:
        if self.sink is None:
            self.events.put(item)
            return
        try:
            self.sink(item)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine for everyone
            log.exception("a job's event sink failed; the job is cancelled")
            self.abandoned.set()


@dataclass
class _InFlight:
    batch: StepBatch
    seqs: list[Sequence]
    handle: PendingStep
    preemptions_before: int


def _host_free(seq: Sequence) -> bool:
    """Whether ``seq``'s next draw needs nothing the host learns from its previous token."""
    p = seq.params
    return p.constraint is None and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty


def read_events(events: queue.SimpleQueue[Any], abandoned: threading.Event) -> Iterator[Any]:
    """A job's events as a blocking generator: an exception is raised, the end is the last item.
    A consumer that stops reading sets ``abandoned``, which cancels the job (no-op once it ended)."""
    try:
        while True:
            item = events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, GenerationEnd):
                return
    finally:
        abandoned.set()


class EngineLoop:
    def __init__(
        self,
        runner: StepRunner,
        *,
        max_batch: int,
        token_budget: int,
        mixed_budget: int | None = None,
        before_admit: BeforeAdmit | None = None,
        observer: LoopObserver | None = None,
        seal_check_interval_s: float = 0.0,
        name: str = "engine-loop",
    ) -> None:
        self.runner = runner
        self.blocks = BlockManager(runner.num_blocks, runner.block_size)
        self.scheduler = Scheduler(self.blocks, max_batch, token_budget, mixed_budget)
        self.max_batch = max_batch
        self._before_admit = before_admit  # the seal check that admits new jobs (SPEC 4121)
        self._checking: tuple[SealCheck | Callable[[], None], tuple[Sequence, ...]] | None = None
        # while jobs run, a check starts at most this often (each one reads every resident byte beside
        # their steps); arrivals in between wait for the next one. Nothing running: at once.
        self._check_interval = seal_check_interval_s
        self._check_started = -float("inf")
        self._observer = observer
        self._cv = threading.Condition()
        self._inbox: deque[_Job] = deque()
        self._jobs: dict[int, _Job] = {}
        self._stopping = False
        self._failed: WorkerError | None = None
        self._tokens_out = 0
        self._rate_t0 = time.monotonic()
        self._last_handout: float | None = None  # when the previous step handed out tokens (step gaps)
        self._to_flush: dict[int, Callable[[], None]] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- the caller's side -------------------------------------------------------------------

    @property
    def max_seq_len(self) -> int:
        return self.runner.max_seq_len

    def submit(self, prompt_ids: Seq[int], params: SamplingParams, cancel: Cancel = None) -> Iterator[Any]:
        """Queue a validated job; iterate the result for TokenEvent... then one GenerationEnd."""
        job = self._enqueue(prompt_ids, params, cancel, None)
        return read_events(job.events, job.abandoned)

    def submit_to(self, prompt_ids: Seq[int], params: SamplingParams, cancel: Cancel, sink: Sink) -> None:
        """Queue a validated job whose events (TokenEvent..., then a GenerationEnd or an exception) are
        handed to ``sink`` on the engine thread, in order; stop it through ``cancel``. A sink with a
        ``flush`` attribute has it called after each step that delivered to it (sinks sharing one
        ``flush`` object: once), before the loop waits or queues the step after next."""
        self._enqueue(prompt_ids, params, cancel, sink)

    def _enqueue(self, prompt_ids: Seq[int], params: SamplingParams, cancel: Cancel, sink: Sink | None) -> _Job:
        if self._failed is not None:
            raise self._failed
        seq = Sequence(list(prompt_ids), params)
        if seq.num_tokens + params.max_tokens > self.runner.max_seq_len:
            raise WorkerError(
                f"prompt ({seq.num_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds the per-job "
                f"capacity of {self.runner.max_seq_len} tokens",
                code=ErrorCode.INVALID_PARAMS,
            )
        job = _Job(seq, queue.SimpleQueue(), cancel, threading.Event(), time.monotonic(), sink=sink,
                   flush=getattr(sink, "flush", None))
        seq.sink = job
        with self._cv:
            if self._stopping:
                raise WorkerError("the engine is shutting down", code=ErrorCode.WORKER_NOT_READY)
            self._inbox.append(job)
            self._cv.notify()
        return job


    def stats(self) -> dict[str, int]:
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting) + len(self._inbox),
            "kv_blocks_used": self.blocks.num_used,
            "kv_blocks_total": self.blocks.num_blocks,
            "preemptions": s.preemptions,
        }

    def tokens_per_second(self) -> float:
        """Output tokens per second since the loop started (retry hints)."""
        dt = time.monotonic() - self._rate_t0
        return self._tokens_out / dt if dt > 0 else 0.0

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; every unfinished job gets a CANCELLED end."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        inflight: _InFlight | None = None
        try:
            while True:
                self._flush()
                with self._cv:
                    while (not self._stopping and not self._inbox and not self.scheduler.has_work
                           and inflight is None):
                        self._last_handout = None  # idle: the next hand-out starts a new run of gaps
                        self._cv.wait()
                    if self._stopping:
                        break
                    while self._inbox:
                        job = self._inbox.popleft()
                        self._jobs[job.seq.seq_id] = job
                        job.seq.seal_checked = self._before_admit is None
                        self.scheduler.add(job.seq)
                self._reap_cancelled()
                self._seal_gate(idle=inflight is None and not self.scheduler.running)
                if inflight is not None and not all(_host_free(q) for q in self.scheduler.running):
                    self._complete(inflight)
                    inflight = None
                    continue
                nxt = self._launch() if self.scheduler.has_work else None
                if inflight is not None:
                    self._complete(inflight)
                elif nxt is None and self.scheduler.has_work:
                    # every runnable job waits for blocks that only a finishing job frees: cannot happen
                    # while admission bounds prompt + max_tokens by the capacity; poll cancels, no spin
                    time.sleep(IDLE_POLL_S)
                inflight = nxt
            if inflight is not None:
                self._complete(inflight)
        except WorkerError as e:
            self._failed = e
            self._fail_all(e)
            return
        except BaseException as e:  # noqa: BLE001 - every job learns of it; nothing hangs
            log.exception("engine loop crashed")
            err = WorkerError(f"engine loop failed ({type(e).__name__})", code=ErrorCode.INTERNAL)
            self._failed = err
            self._fail_all(err)
            return
        with self._cv:
            pending = list(self._inbox)
            self._inbox.clear()
        for job in pending:
            self._jobs[job.seq.seq_id] = job
            self.scheduler.add(job.seq)
        for job in list(self._jobs.values()):
            self._end(job, "cancelled")
        self._flush()

    def _reap_cancelled(self) -> None:
        for job in list(self._jobs.values()):
            if job.cancelled():
                self._end(job, "cancelled")

    def _launch(self) -> _InFlight | None:
        """Schedule the next step and queue it on the runner; None when nothing can run now."""
        batch, seqs = self.scheduler.schedule()
        if not batch.rows:
            return None
        now = time.monotonic()
        for s in seqs:
            if s.first_scheduled is None:
                s.first_scheduled = now
                if self._observer is not None:
                    self._observer.admitted((now - self._jobs[s.seq_id].t_submit) * 1e3)
        before = self.scheduler.preemptions
        handle = self.runner.launch(batch)
        for row, seq in zip(batch.rows, seqs, strict=True):
            seq.num_computed += len(row.tokens)
            if row.sample is not None:
                seq.output.append(PENDING)  # its token: read by the next step on the device, here later
        return _InFlight(batch, seqs, handle, before)

    def _seal_gate(self, idle: bool) -> None:
        """Finish the seal check in flight if the device has computed it, clearing the jobs it
        covers for admission, then start one for the jobs that arrived since (at most one per
        ``seal_check_interval_s`` while jobs run); when nothing else can run (``idle``: no step in
        flight, no running job, no cleared job waiting) start it at once and wait for it. A
        failure fails the covered jobs and, raised, every job (fatal, 4122)."""
        if self._before_admit is None:
            return
        while True:
            waiting = self.scheduler.waiting
            blocked = idle and not any(s.seal_checked for s in waiting)
            if self._checking is not None:
                check, covered = self._checking
                ready = getattr(check, "ready", None)
                if not blocked and ready is not None and not ready():
                    return
                self._checking = None
                try:
                    check()
                except WorkerError as e:
                    self._fail_covered(covered, e)
                    raise
                for seq in covered:
                    seq.seal_checked = True
                continue
            unchecked = tuple(s for s in waiting if not s.seal_checked)
            if not unchecked or (not blocked and time.monotonic() - self._check_started < self._check_interval):
                return
            self._check_started = time.monotonic()
            try:
                started = self._before_admit(len(unchecked), beside_steps=not blocked)
            except WorkerError as e:
                self._fail_covered(unchecked, e)
                raise
            if started is None:
                for seq in unchecked:
                    seq.seal_checked = True
                return
            self._checking = (started, unchecked)
            if not blocked:
                return

    def _fail_covered(self, covered: tuple[Sequence, ...], err: WorkerError) -> None:
        for seq in covered:
            job = self._jobs.get(seq.seq_id)
            if job is not None:
                self._fail(job, err)

    def _complete(self, step: _InFlight) -> None:
        """Read a launched step's tokens and hand them out (in row order)."""
        outs = step.handle.result()
        done = time.monotonic()
        interval_ms = None if self._last_handout is None or not outs else (done - self._last_handout) * 1e3
        self._last_handout = done if outs else None
        k = 0
        for row, seq in zip(step.batch.rows, step.seqs, strict=True):
            if row.sample is None:
                continue
            out = outs[k]
            k += 1
            job = self._jobs.get(seq.seq_id)
            if job is None or seq.status is SeqStatus.FINISHED:
                continue  # it ended while this step ran (a stop in the step before, a cancel): dropped
            i = row.sample.step
            seq.output[i] = out.token_id
            if job.t_prefill_done is None:
                job.t_prefill_done = done
            self._tokens_out += 1
            if job.t_first is None:
                job.t_first = done
            if job.cancelled():  # no token after an acknowledged cancel (SPEC 4252)
                self._end(job, "cancelled")
                continue
            self._deliver(job, TokenEvent(i, out.token_id, out.logprob, out.top_logprobs))
            if out.token_id in seq.params.stop_ids:
                self._end(job, "eos")
            elif i + 1 >= seq.params.max_tokens:
                self._end(job, "max_tokens")
        if self._observer is not None:
            st = self.stats()
            for _ in range(self.scheduler.preemptions - step.preemptions_before):
                self._observer.preempted()
            self._observer.step(len(step.batch.rows), step.batch.num_tokens, st["running"], st["waiting"],
                                st["kv_blocks_used"], st["kv_blocks_total"], interval_ms)

    # --- endings -----------------------------------------------------------------------------

    def _end(self, job: _Job, reason: str) -> None:
        seq = job.seq
        if seq.seq_id not in self._jobs:
            return
        del self._jobs[seq.seq_id]
        if seq.status is not SeqStatus.FINISHED:
            self.scheduler.finish(seq, reason)
        while seq.output and seq.output[-1] == PENDING:
            seq.output.pop()  # a draw still in flight that will be dropped
        now = time.monotonic()
        start = seq.first_scheduled or now
        first = job.t_first or now
        self._deliver(
            job,
            GenerationEnd(
                tokens_in=len(seq.prompt),
                tokens_out=len(seq.output),
                stop_reason=reason,  # type: ignore[arg-type]
                prefill_ms=((job.t_prefill_done or now) - start) * 1e3,
                ttft_ms=(first - job.t_submit) * 1e3,
                decode_time_ms=(now - first) * 1e3 if job.t_first is not None else 0.0,
                queue_ms=(start - job.t_submit) * 1e3,
                preemptions=seq.preemptions,
            )
        )

    def _fail(self, job: _Job, err: BaseException) -> None:
        seq = job.seq
        if self._jobs.pop(seq.seq_id, None) is None:
            return
        if seq.status is not SeqStatus.FINISHED:
            self.scheduler.finish(seq, "failed")
        self._deliver(job, err)

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            self._stopping = True
            pending = list(self._inbox)
            self._inbox.clear()
        for job in pending:
            self._deliver(job, err)
        for job in list(self._jobs.values()):
            self._fail(job, err)
        self._flush()

    def _deliver(self, job: _Job, item: Any) -> None:
        job.deliver(item)
        if job.flush is not None:
            self._to_flush[id(job.flush)] = job.flush

    def _flush(self) -> None:
        """Once per step: wake each consumer that got events (see ``submit_to``)."""
        while self._to_flush:
            _, flush = self._to_flush.popitem()
            try:
                flush()
            except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine for everyone
                log.exception("a sink's flush failed")
