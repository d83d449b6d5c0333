"""Single-slot scheduler (SPEC "Scheduler (M0)", 4251, /cancel semantics)."""

from __future__ import annotations

import asyncio

import pytest

from worker_orcd.errors import ErrorCode, WorkerError
from worker_orcd.scheduler import Scheduler


def test_worker_m0_one_job_at_a_time_busy_is_retriable() -> None:
    s = Scheduler()
    job = s.admit("owner-a", "cid")
    assert job.state == "pending" and s.active is job
    with pytest.raises(WorkerError) as e:
        s.admit("owner-b", "cid2")
    assert e.value.code == ErrorCode.WORKER_BUSY and e.value.retriable and e.value.retry_after_ms
    s.start(job)
    assert job.state == "executing"
    with pytest.raises(WorkerError):  # also refused while executing
        s.admit("owner-b", "cid2")
    s.finish(job, ok=True)
    assert job.state == "completed" and s.active is None
    s.admit("owner-b", "cid3")


def test_worker_m0_slot_freed_on_failure_and_finish_is_idempotent() -> None:
    s = Scheduler()
    job = s.admit("o", "c")
    s.finish(job, ok=False)
    s.finish(job, ok=True)  # a late second report does not rewrite the outcome
    assert job.state == "failed" and s.active is None


def test_worker_cancel_stops_job_and_is_idempotent_after_end() -> None:
    s = Scheduler()
    woke: list[int] = []
    job = s.admit("o", "c", job_id="job-1")
    job.on_stop = lambda: woke.append(1)
    assert s.cancel("job-1", "o") is job
    assert job.cancel.is_set() and job.stop_code == ErrorCode.CANCELLED and woke == [1]
    s.cancel("job-1", "o")
    assert woke == [1, 1] and job.stop_code == ErrorCode.CANCELLED  # a repeat only wakes the stream again
    s.finish(job, ok=False)
    assert s.cancel("job-1", "o") is job  # after the end: same answer, nothing to stop
    assert job.state == "failed"


def test_worker_4251_cancel_by_another_caller_forbidden_even_after_end() -> None:
    s = Scheduler()
    job = s.admit("o", "c", job_id="job-1")
    with pytest.raises(WorkerError) as e:
        s.cancel("job-1", "intruder")
    assert e.value.code == ErrorCode.FORBIDDEN and e.value.http_status == 403
    assert not job.cancel.is_set()
    s.finish(job, ok=True)
    with pytest.raises(WorkerError) as e:
        s.cancel("job-1", "intruder")
    assert e.value.code == ErrorCode.FORBIDDEN


def test_worker_cancel_unknown_job_not_found() -> None:
    with pytest.raises(WorkerError) as e:
        Scheduler().cancel("nope", "o")
    assert e.value.code == ErrorCode.NOT_FOUND and "job_id" in e.value.message


def test_worker_first_stop_reason_wins() -> None:
    s = Scheduler()
    job = s.admit("o", "c")
    assert job.request_stop(ErrorCode.INFERENCE_TIMEOUT, "too slow")
    job.request_stop(ErrorCode.CANCELLED, "cancel")
    assert job.stop_code == ErrorCode.INFERENCE_TIMEOUT and job.stop_message == "too slow"
    s.finish(job, ok=False)
    assert not job.request_stop(ErrorCode.CANCELLED, "late")


def test_worker_job_id_reuse_refused_and_history_bounded() -> None:
    s = Scheduler(history=3)
    for n in range(5):
        s.finish(s.admit("o", "c", job_id=f"j{n}"), ok=True)
    with pytest.raises(WorkerError) as e:
        s.admit("o", "c", job_id="j4")
    assert e.value.code == ErrorCode.INVALID_PARAMS and "job_id" in e.value.message
    with pytest.raises(WorkerError) as e:
        s.cancel("j0", "o")  # forgotten: older than the history
    assert e.value.code == ErrorCode.NOT_FOUND


def test_worker_wait_idle() -> None:
    async def scenario() -> tuple[bool, bool]:
        s = Scheduler()
        job = s.admit("o", "c")
        early = await s.wait_idle(0.05)
        asyncio.get_running_loop().call_later(0.05, s.finish, job, True)
        late = await s.wait_idle(2)
        return early, late

    assert asyncio.run(scenario()) == (False, True)
