"""Job admission (SPEC 4251, 4982 slots_total; issue 8): who may start, who waits, who is told to retry.

The engine batches up to ``slots`` jobs at once (``--max-batch``, alias
``slots_total``) and queues up to ``max_queue`` more; a job beyond that is
refused with a retriable WORKER_BUSY whose ``retry_after_ms`` comes from the
measured rate at which jobs finish. ``slots=1`` with no queue is M0 exactly:
one job, every other caller busy. A job is admitted ``pending``, becomes
``executing`` when the engine first schedules it, and ends ``completed`` or
``failed``; it leaves the admission count only in ``finish()``, which the job
runner calls after the engine has really stopped working on it.

Ended jobs are remembered (bounded) so that a cancel stays idempotent after
the job is over and still checks who owns it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .errors import CODE_INFO, ErrorCode, WorkerError

JobState = Literal["pending", "executing", "completed", "failed"]
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
HISTORY = 1024


@dataclass(eq=False)
class Job:
    job_id: str
    owner: str  # SHA-256 of the bearer token that started it
    correlation_id: str
    admitted_at: float = field(default_factory=time.monotonic)
    state: JobState = "pending"
    # Set by cancel/disconnect/timeout/shutdown; the engine polls it once per decode step.
    cancel: threading.Event = field(default_factory=threading.Event)
    stop_code: ErrorCode | None = None
    stop_message: str = ""
    on_stop: Callable[[], None] | None = None  # wakes the job's stream; called on the event loop
    tokens_sent: int = 0  # token events written to the stream so far (frozen once a stop is requested)

    @property
    def active(self) -> bool:
        return self.state in ("pending", "executing")

    def request_stop(self, code: ErrorCode, message: str) -> bool:
        """Ask the job to stop; the first reason wins (a cancel after a timeout stays a timeout)."""
        if not self.active:
            return False
        if self.stop_code is None:
            self.stop_code, self.stop_message = code, message
        self.cancel.set()
        if self.on_stop is not None:
            self.on_stop()
        return True


class Scheduler:
    def __init__(self, history: int = HISTORY, slots: int = 1, max_queue: int = 0) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, Job] = {}  # admitted, not finished (running or queued), admission order
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._history = history
        self._idle = asyncio.Event()
        self._idle.set()
        self.configure(slots, max_queue)
        self._finish_rate = 0.0  # jobs per second, exponentially averaged over finishes
        self._last_finish: float | None = None

    def configure(self, slots: int, max_queue: int) -> None:
        """Set the engine's batch size and the wait queue's bound (once the model is loaded)."""
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots must be >= 1 and max_queue >= 0, got {slots}, {max_queue}")
        self.slots = slots
        self.max_queue = 0 if slots == 1 else max_queue  # one slot = M0: busy, never queued

    @property
    def capacity(self) -> int:
        return self.slots + self.max_queue

    @property
    def active(self) -> Job | None:
        """The oldest admitted job (None when idle)."""
        with self._lock:
            return next(iter(self._active.values()), None)

    def active_jobs(self) -> list[Job]:
        with self._lock:
            return list(self._active.values())

    def counts(self) -> tuple[int, int]:
        """(executing, waiting) among admitted jobs."""
        with self._lock:
            running = sum(1 for j in self._active.values() if j.state == "executing")
            return running, len(self._active) - running

    def admit(self, owner: str, correlation_id: str, job_id: str | None = None) -> Job:
        """Admit a job (it may wait for a batch slot) or refuse with WORKER_BUSY and a retry hint."""
        with self._lock:
            if len(self._active) >= self.capacity:
                retry = self._retry_after_ms_locked()
                why = "busy with another job" if self.capacity == 1 else (
                    f"at capacity ({self.slots} running + {self.max_queue} queued)"
                )
                raise WorkerError(
                    f"worker is {why}; retry after {retry} ms", code=ErrorCode.WORKER_BUSY, retry_after_ms=retry
                )
            if job_id is None:
                job_id = uuid.uuid4().hex
            elif job_id in self._jobs:
                raise WorkerError(f"job_id: {job_id!r} was already used", code=ErrorCode.INVALID_PARAMS)
            job = Job(job_id=job_id, owner=owner, correlation_id=correlation_id)
            self._active[job_id] = job
            self._idle.clear()
            self._jobs[job_id] = job
            while len(self._jobs) > self._history:
                self._jobs.popitem(last=False)
            return job

    def start(self, job: Job) -> None:
        with self._lock:
            if job.state == "pending":
                job.state = "executing"

    def finish(self, job: Job, ok: bool) -> None:
        """End the job and free its place; safe to call twice (the first outcome stays)."""
        with self._lock:
            if job.active:
                job.state = "completed" if ok else "failed"
            if self._active.pop(job.job_id, None) is job:
                now = time.monotonic()
                if self._last_finish is not None:
                    dt = max(now - self._last_finish, 1e-3)
                    self._finish_rate = 0.8 * self._finish_rate + 0.2 / dt if self._finish_rate else 1 / dt
                self._last_finish = now
            if not self._active:
                self._idle.set()

    def cancel(self, job_id: str, owner: str) -> Job:
        """Stop a job for its owner; idempotent, also after the job ended (SPEC /cancel)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise WorkerError(f"job_id: no job {job_id!r} is known to this worker", code=ErrorCode.NOT_FOUND)
        if job.owner != owner:
            # Same answer whether or not it still runs: a foreign caller learns nothing more.
            raise WorkerError(f"job {job_id!r} belongs to another caller", code=ErrorCode.FORBIDDEN)
        job.request_stop(ErrorCode.CANCELLED, "job cancelled by its owner")
        return job

    async def wait_idle(self, timeout: float) -> bool:
        """True once no job is admitted; False if that did not happen within ``timeout``."""
        if timeout <= 0:
            return self._idle.is_set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def retry_after_ms(self) -> int:
        with self._lock:
            return self._retry_after_ms_locked()

    def _retry_after_ms_locked(self) -> int:
        """When a place should free up: one job's share of the measured finish rate (bounded)."""
        floor = CODE_INFO[ErrorCode.WORKER_BUSY].retry_after_ms or 250
        if self._finish_rate <= 0:
            return floor
        return int(min(30_000, max(floor, 1000 / self._finish_rate)))
