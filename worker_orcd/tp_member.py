"""`worker-orcd serve --tp-rank R` with R > 0: a tensor-parallel member (SPEC 4500-4522).

Rank 0 serves HTTP/SSE and schedules; a member serves no API. It opens its device, joins the
group (the engine authenticates it: ``engine/tensor_parallel.py``), loads, verifies and seals its
shard of ``--model`` exactly as rank 0 does (digest, signature, GGUF and capability checks; the
handle carries ``shard_index``/``total_shards`` and a shard id naming the group), then runs every
step rank 0 broadcasts, re-verifying its seal before each step that starts a job. It ends when
rank 0 ends the group (a drain or shutdown there: exit 0) or on any failure (rank 0 lost or
hung past ``--tp-timeout-sec``, a failed seal: exit 1, after the status callback when one is
configured). SIGTERM ends a member at once; rank 0 then sees a lost peer and stops, so drain a
group through rank 0.
"""

from __future__ import annotations

import asyncio
import logging
import os

from . import logs, privileges
from .config import WorkerConfig
from .errors import ErrorCode, WorkerError
from .lifecycle import EngineBinding, State, Worker

EXIT_OK, EXIT_FAILURE = 0, 1


async def serve_member(
    config: WorkerConfig, binding: EngineBinding, *, drop_plan: privileges.DropPlan | None = None
) -> int:
    """Join, load and seal this rank's shard, follow rank 0; returns the process exit code."""
    from .serve import model_commit

    worker = Worker(config, binding)
    logs.event(
        "startup", "worker-orcd tensor-parallel rank {tp_rank} of {tp_degree} in group {tp_group_id} starting as "
        "{worker_id}; rank 0 serves the API.",
        pid=os.getpid(), tp_rank=config.tp_rank, tp_degree=config.tp_degree, tp_group_id=config.tp_group_id,
        worker_id=config.worker_id, device=config.device, dev_mode=config.dev_mode,
    )
    try:
        if drop_plan is not None:
            privileges.harden_early(drop_plan)
        await worker.open_device()
        if drop_plan is not None:
            privileges.drop(drop_plan)
        handle, _ = await worker.commit(model_commit(config))
        sealed = worker.sealed
        assert sealed is not None
        worker.set_state(State.READY)
        logs.event(
            "tp_member_ready", "Rank {tp_rank} holds sealed shard {shard_id} of {model_ref}; following rank 0.",
            tp_rank=config.tp_rank, shard_id=handle.shard_id, model_ref=handle.model_ref,
        )
        reason = await asyncio.to_thread(sealed.resident.follow, sealed.verify_seal)
        logs.event("tp_member_stopped", "Rank {tp_rank} stops: {reason}.", tp_rank=config.tp_rank, reason=reason)
    except WorkerError as e:
        return await _failed(worker, config, e)
    except Exception as e:  # noqa: BLE001 - untyped: INTERNAL, traceback only in the log
        logs.event("internal_error", "Unexpected {exc_type} in tensor-parallel rank {tp_rank}.", level=logging.ERROR,
                   exc=e, tp_rank=config.tp_rank)
        return await _failed(worker, config, WorkerError("internal error; see the log", code=ErrorCode.INTERNAL))
    await worker.close()
    worker.finish()
    return EXIT_OK


async def _failed(worker: Worker, config: WorkerConfig, error: WorkerError) -> int:
    worker.exit_code = EXIT_FAILURE
    logs.event(
        "fatal", "Tensor-parallel rank {tp_rank} stops with {code}: {error}", level=logging.ERROR,
        tp_rank=config.tp_rank, code=error.code.value, error=error.message, exit_code=EXIT_FAILURE,
    )
    worker.set_state(State.STOPPED)
    await worker.report_failure(error)  # the status callback first: telling rank 0 may wait up to 10 s
    await worker.abandon_group(error)
    return EXIT_FAILURE
