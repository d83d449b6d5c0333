"""Single-slot job scheduler (SPEC "Scheduler (M0)", 4251).

One job at a time: a job is admitted ``pending``, runs ``executing`` and ends
``completed`` or ``failed``; while one is pending or executing every other is
refused with a retriable WORKER_BUSY. The slot is released only by
``finish()``, which the job runner calls after the engine thread has really
stopped, so two generations can never share the resident model's KV cache.

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
    def __init__(self, history: int = HISTORY) -> None:
        self._lock = threading.Lock()
        self._active: Job | None = None
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._history = history
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> Job | None:
        return self._active

    def admit(self, owner: str, correlation_id: str, job_id: str | None = None) -> Job:
        """Take the slot or refuse with WORKER_BUSY (retriable, with a retry hint)."""
        with self._lock:
            if self._active is not None:
                raise WorkerError(
                    f"worker is busy with another job; retry after {self.retry_after_ms()} ms",
                    code=ErrorCode.WORKER_BUSY,
                    retry_after_ms=self.retry_after_ms(),
                )
            if job_id is None:
                job_id = uuid.uuid4().hex
            elif job_id in self._jobs:
                raise WorkerError(f"job_id: {job_id!r} was already used", code=ErrorCode.INVALID_PARAMS)
            job = Job(job_id=job_id, owner=owner, correlation_id=correlation_id)
            self._active = job
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
        """End the job and free the slot; safe to call twice (the first outcome stays)."""
        with self._lock:
            if job.active:
                job.state = "completed" if ok else "failed"
            if self._active is job:
                self._active = None
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
        """True once no job holds the slot; False if that did not happen within ``timeout``."""
        if timeout <= 0:
            return self._idle.is_set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def retry_after_ms(self) -> int:
        info = CODE_INFO[ErrorCode.WORKER_BUSY]
        return info.retry_after_ms or 250
