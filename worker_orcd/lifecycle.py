"""The worker's lifecycle: one device, one sealed model, one state machine (SPEC 4020-4032).

``Worker`` owns everything with a process lifetime (engine, resident model,
tokenizer, scheduler, seal key) and the transitions between
``starting -> loading -> ready -> executing -> draining -> stopped``. The HTTP
layer only asks it questions and hands it work; serve.py drives startup and
exit. The GPU layer is reached only through ``EngineBinding``, whose real
implementation (serve.py) imports ``worker_orcd.engine.api`` lazily, so this
module imports and tests without torch. The engine's interface is declared once,
in ``engine/interface.py``; sealing and verifying is host work (``residency.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from . import logs
from .callback import CallbackClient
from .capability import ECP, match
from .config import WorkerConfig
from .engine.interface import EngineLike, ResidentModelLike
from .engine.profile import build_ecp
from .engine.tp_plan import tp_shard_id
from .errors import ErrorCode, InvalidParams, ModelLoadError, WorkerError
from .gguf.constants import Limits
from .gguf.reader import GGUFFile
from .loader import LoadOptions, validate_model
from .metrics import Metrics
from .residency import PendingSealCheck, SealedModel, load_sealed
from .scheduler import Scheduler
from .seal import ModelShardHandle, Sealer

# Errors after which this process cannot be trusted to serve: stopped, reported, exit non-zero (4032, 4122, 4960).
FATAL_CODES = frozenset({ErrorCode.CUDA_ERROR, ErrorCode.SEAL_VERIFICATION_FAILED, ErrorCode.TP_GROUP_FAILED})
MB = 1_000_000


class _TimedSealCheck:
    """A started seal check that reports the engine thread's time in it (both halves) when it finishes."""

    def __init__(self, pending: PendingSealCheck, started_ms: float, report: Callable[[float], None]) -> None:
        self._pending, self._started_ms, self._report = pending, started_ms, report

    def ready(self) -> bool:
        return self._pending.ready()

    def __call__(self) -> None:
        t1 = time.perf_counter()
        try:
            self._pending()
        finally:
            self._report(self._started_ms + (time.perf_counter() - t1) * 1000)


class State(str, Enum):
    """SPEC 4030. The later spec's names map as: busy = executing, failed = stopped."""

    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    EXECUTING = "executing"
    DRAINING = "draining"
    STOPPED = "stopped"


class TokenizerLike(Protocol):
    @property
    def eos_ids(self) -> frozenset[int]: ...

    def encode(self, text: str) -> list[int]: ...
    def stream(self, skip_special: bool = False) -> Any: ...


@dataclass(frozen=True)
class EngineBinding:
    """How the host reaches the GPU layer; tests pass a fake, serve.py the real engine."""

    open: Callable[[], EngineLike]
    sampling_params: Callable[..., Any]
    tokenizer: Callable[[GGUFFile], TokenizerLike]


@dataclass(frozen=True)
class Commit:
    """What POST /worker/commit (or --model) asks for (SPEC 4221)."""

    model_ref: str  # what the handle and the callback call the model
    source: str  # where the bytes are: path / file: URI / shm:NAME
    model_root: Path
    expected_sha256: str | None = None
    shard_id: str | None = None
    shard_index: int = 0
    total_shards: int = 1


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        binding: EngineBinding,
        metrics: Metrics | None = None,
        force_exit: Callable[[int], None] = os._exit,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._force_exit = force_exit  # what the shutdown watchdog calls; tests replace os._exit
        self._on_loaded = on_loaded  # after each successful load and seal (serve.settle_heap in the daemon)
        self.binding = binding
        self.metrics = metrics or Metrics()
        self.scheduler = Scheduler()
        self.sealer = Sealer()
        self.engine: EngineLike | None = None
        self.sealed: SealedModel | None = None  # the resident model and the seal over it
        self.tokenizer: TokenizerLike | None = None
        self.ecp: ECP | None = None
        self.uri: str | None = None
        self.callback = (
            CallbackClient(config.callback_url, attempts=config.callback_attempts, timeout_sec=config.callback_timeout_sec)
            if config.callback_url
            else None
        )
        self.started_at = time.monotonic()
        self.exit_code = 0
        self.stop_requested = asyncio.Event()  # serve.py stops the HTTP server when this is set
        self._state = State.STARTING
        self._commit_lock = asyncio.Lock()
        self._draining: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._watchdog: threading.Timer | None = None
        self._report: asyncio.Task[None] | None = None  # the status callback: once, however many paths fail
        self.last_seal_ms = 0.0  # the engine loop's latest per-step seal check
        # Set while a model is being loaded, None otherwise: what /health shows (503 "loading", issue 13).
        # Replaced whole (never mutated) from the load thread, so a reader always sees one coherent dict.
        self.load_progress: dict[str, Any] | None = None

    # --- state ---------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def set_state(self, new: State) -> None:
        old = self._state
        if old == new or old == State.STOPPED:
            return  # stopped is final
        self._state = new
        self.metrics.set_state(new.value)
        logs.event("state", "Worker state {from_state} -> {state}.", state=new.value, from_state=old.value)

    @property
    def model(self) -> ResidentModelLike | None:
        sealed = self.sealed
        return sealed.resident if sealed is not None else None

    @property
    def handle(self) -> ModelShardHandle | None:
        sealed = self.sealed
        return sealed.handle if sealed is not None else None

    @property
    def loading_model(self) -> bool:
        """A load is running and nothing is sealed yet: only /health, /metrics, /worker/ready, /shutdown answer."""
        return self.load_progress is not None

    def _progress(self, phase: str, done: int = 0, total: int | None = None) -> None:
        self.load_progress = {"phase": phase, "bytes_done": done, "bytes_total": total}

    def _on_upload(self, done: int, total: int) -> None:
        """The engine's per-chunk report (on the load thread); all bytes up means warm-up and graph capture."""
        if self.load_progress is not None:
            self._progress("upload" if done < total else "capture", done, total)

    @property
    def accepting(self) -> bool:
        return self._state in (State.READY, State.EXECUTING)

    def begin_job(self) -> None:
        if self._state == State.READY:
            self.set_state(State.EXECUTING)

    def end_job(self) -> None:
        if self._state == State.EXECUTING and self.scheduler.active is None:
            self.set_state(State.READY)

    def batching(self) -> dict[str, int]:
        """Slots and queue depth for /health and /worker/ready."""
        running, waiting = self.scheduler.counts()
        return {
            "slots_total": self.scheduler.slots,
            "slots_busy": running,
            "queue_depth": waiting,
            "queue_limit": self.scheduler.max_queue,
        }

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    # --- device and model ----------------------------------------------------------------

    async def open_device(self) -> None:
        """Open the one device of this process and derive the (true) ECP from it."""
        engine = await asyncio.to_thread(self.binding.open)
        self.engine = engine
        total = int(engine.memory()["total_bytes"])
        self.ecp = build_ecp(self.config.worker_id, 0 if self.config.dev_mode else total)
        if self.config.dev_mode:
            logs.event(
                "dev_mode",
                "DEVELOPMENT MODE: the engine runs on the CPU; nothing is resident in VRAM and performance "
                "is not representative. Never use --device cpu in production.",
                level=logging.WARNING, device="cpu",
            )
            logs.event("device_open", "Opened the CPU for development mode ({size_mb:.1f} MB of host memory).",
                       device="cpu", size_bytes=total, size_mb=total / MB)
        else:
            logs.event("device_open", "Opened GPU {gpu_device} ({size_mb:.1f} MB of device memory).",
                       device=self.config.device, gpu_device=self.config.gpu_device, size_bytes=total, size_mb=total / MB)

    def _load_options(self, model_root: Path, expected: str | None) -> LoadOptions:
        return LoadOptions(
            model_root=model_root,
            expected_sha256=expected.lower() if expected else None,
            public_key_path=self.config.model_public_key,
            limits=Limits(max_file_size=self.config.max_model_size_bytes),
            require_signature=self.config.require_signature,
        )

    def _loader_log(self, event: str, fields: dict[str, Any]) -> None:
        if event == "model_digest":
            size = fields.get("size")
            logs.event(
                "model_digest", "Hashed {model_ref} ({size_mb:.1f} MB): SHA-256 {digest}.",
                model_ref=fields.get("model_ref"), digest=fields.get("sha256"), size_bytes=size,
                size_mb=size / MB if isinstance(size, int) else None,
            )
        elif event == "model_validated":
            logs.event(
                "model_validated",
                "{model_ref} ({architecture}) passed the digest, signature ({signature}), GGUF and capability checks.",
                model_ref=fields.get("model_ref"), digest=fields.get("sha256"), model_id=fields.get("model_id"),
                architecture=fields.get("architecture"), signature=fields.get("signature"),
            )

    async def commit(self, req: Commit) -> tuple[ModelShardHandle, bool]:
        """Validate, load and seal one model (SPEC 4220-4227); (handle, newly loaded).

        Repeating the commit of the loaded model returns its handle; a different one is refused (4022).
        A repeat is checked like a first commit (issue 10, defect 3): its source is resolved under
        the model root, hashed and parsed, and must be the sealed bytes; naming the sealed model
        is not enough. A commit names the shard this process was started to hold (``_own_shard``).
        """
        req = self._own_shard(req)
        async with self._commit_lock:
            current = self.handle
            if current is not None:
                if self._same_model(current, req):
                    await self._check_repeat(current, req)
                    return current, False
                raise ModelLoadError(
                    f"this worker already holds model {current.model_ref!r} (digest {current.digest}); "
                    "one model per process (SPEC 4022): start another worker for another model"
                )
            if self._state != State.STARTING or self.engine is None or self.ecp is None:
                raise WorkerError(f"cannot load a model while {self._state.value}", code=ErrorCode.WORKER_NOT_READY)
            self.set_state(State.LOADING)
            self._progress("validate")
            t0 = time.monotonic()
            try:
                sealed, size = await self._load(req)
            except WorkerError as e:
                self._load_failed()
                if e.code in FATAL_CODES:
                    self.fail(e)
                raise
            except BaseException:
                self._load_failed()
                raise
            finally:
                self.load_progress = None
            self.sealed = sealed
            handle, resident = sealed.handle, sealed.resident
            vram = 0 if self.config.dev_mode else resident.vram_bytes()
            self.metrics.vram_bytes.set(vram)
            logs.set_context(model_ref=handle.model_ref)
            load_s = time.monotonic() - t0
            logs.event(
                "sealed",
                "Loaded {model_ref} ({size_mb:.1f} MB) onto the CPU in development mode in {load_s:.1f} s and sealed "
                "it as shard {shard_id}; contexts up to {max_seq_len} tokens."
                if self.config.dev_mode else
                "Loaded {model_ref} ({size_mb:.1f} MB) onto GPU {gpu_device} in {load_s:.1f} s and sealed it as shard "
                "{shard_id}; {vram_bytes} bytes resident in VRAM, contexts up to {max_seq_len} tokens.",
                model_ref=handle.model_ref, shard_id=handle.shard_id, digest=handle.digest, vram_bytes=vram,
                size_bytes=size, size_mb=size / MB, load_s=round(load_s, 3), load_ms=round(load_s * 1000),
                max_seq_len=resident.max_seq_len, gpu_device=self.config.gpu_device,
            )
            if self._on_loaded is not None:
                try:
                    self._on_loaded()
                except Exception as e:  # noqa: BLE001 - housekeeping: never fails a sealed load
                    logs.event("internal_error", "After-load hook failed: {exc_type}.", level=logging.WARNING, exc=e)
            return handle, True

    def _own_shard(self, req: Commit) -> Commit:
        """``req`` for this process's shard, or INVALID_PARAMS naming what does not match.

        A process holds one shard, fixed at startup: shard 0 of 1 without ``--tp-*`` flags, else
        shard ``--tp-rank`` of ``--tp-degree`` (joining the group while it loads). Its shard id is
        the group's ``{group}-shard{R}of{T}`` (inside the seal); another one is refused.
        """
        c = self.config
        if req.total_shards != c.tp_degree:
            if c.tp_degree == 1:
                raise InvalidParams(
                    f"total_shards: this worker was not started as a member of a tensor-parallel group of "
                    f"{req.total_shards} (it has no --tp-degree): start {req.total_shards} workers with --tp-degree "
                    f"{req.total_shards}, --tp-rank, --tp-group-id, --tp-members, --tp-master and --tp-secret-file"
                )
            raise InvalidParams(
                f"total_shards: this worker is rank {c.tp_rank} of tensor-parallel group {c.tp_group_id!r} of "
                f"{c.tp_degree} ranks (--tp-degree {c.tp_degree}), not of {req.total_shards}"
            )
        if req.shard_index != c.tp_rank:
            raise InvalidParams(
                f"shard_index: this worker holds shard {c.tp_rank} of {c.tp_degree} (--tp-rank {c.tp_rank}), "
                f"not {req.shard_index}; send that shard's commit to the worker started with --tp-rank {req.shard_index}"
            )
        if c.tp_degree == 1:
            return req
        assert c.tp_group_id is not None
        shard_id = tp_shard_id(c.tp_group_id, c.tp_rank, c.tp_degree)
        if req.shard_id is not None and req.shard_id != shard_id:
            raise InvalidParams(f"shard_id: a tensor-parallel shard is named after its group: {shard_id!r}, not {req.shard_id!r}")
        return dataclasses.replace(req, shard_id=shard_id)

    def _load_failed(self) -> None:
        """Back to ``starting`` for another commit, unless a drain or a stop already moved on."""
        if self._state == State.LOADING:
            self.set_state(State.STARTING)

    async def _load(self, req: Commit) -> tuple[SealedModel, int]:
        """(the sealed resident model, the model file's size in bytes)."""
        assert self.engine is not None
        engine = self.engine
        logs.event(
            "model_load", "Loading {model_ref}: size, GGUF and capability checks come first; hash and signature "
            "too when an expected digest or a key is set (else the upload hashes, one pass).",
            model_ref=req.model_ref,
        )
        options = self._load_options(req.model_root, req.expected_sha256)
        validated = await asyncio.to_thread(
            partial(validate_model, req.source, options, self.ecp, self._loader_log, one_pass=True)
        )
        tokenizer = await asyncio.to_thread(self.binding.tokenizer, validated.gguf)
        shard_id = req.shard_id or f"{self.config.worker_id}-shard{req.shard_index}"
        loop = asyncio.get_running_loop()

        def on_fatal(error: WorkerError) -> None:  # an engine thread: a TP peer lost while no job runs
            loop.call_soon_threadsafe(self.fail, error)

        # The engine streams the file and fingerprints what is resident; the seal is ours (SPEC 4120).
        sealed = await asyncio.to_thread(
            partial(
                load_sealed, engine, validated, sealer=self.sealer, shard_id=shard_id,
                shard_index=req.shard_index, total_shards=req.total_shards,
                model_ref=req.model_ref,  # the handle names the model as the caller does
                kv_cache_mb=self.config.kv_cache_size_mb,
                max_batch=self.config.max_batch, prefill_chunk=self.config.prefill_chunk,
                mixed_step_tokens=self.config.mixed_step_tokens,
                # M0 (--max-batch 1) keeps the per-request check before the stream opens (500 on mismatch)
                before_admit=None if self.config.max_batch == 1 else self._seal_check_in_step, observer=self.metrics,
                progress=self._on_upload, on_fatal=on_fatal, seal_check_interval_ms=self.config.seal_check_interval_ms,
            )
        )
        done = self.load_progress or {}
        self._progress("seal", done.get("bytes_done", 0), done.get("bytes_total"))
        try:
            # SPEC 4031: ready only once the seal verifies over what is really resident.
            await asyncio.to_thread(sealed.verify_seal)
        except BaseException:
            await asyncio.to_thread(sealed.close)
            raise
        self.tokenizer = tokenizer
        self.scheduler.configure(sealed.resident.max_batch, self.config.max_queue)
        self.metrics.bind_engine(sealed.resident.stats)
        return sealed, validated.size

    async def _check_repeat(self, current: ModelShardHandle, req: Commit) -> None:
        options = self._load_options(req.model_root, req.expected_sha256)
        validated = await asyncio.to_thread(validate_model, req.source, options, None, self._loader_log)
        if validated.digest != current.digest:
            raise ModelLoadError(
                f"this worker already holds model {current.model_ref!r} (digest {current.digest}); the file named "
                "by this commit is a different model (SPEC 4022)"
            )

    def _same_model(self, current: ModelShardHandle, req: Commit) -> bool:
        if req.shard_id is not None and req.shard_id != current.shard_id:
            return False
        if req.expected_sha256 is not None:
            return req.expected_sha256.lower() == current.digest
        return req.model_ref == current.model_ref

    async def plan(self, model_ref: str, tp_degree: int) -> dict[str, Any]:
        """Feasibility under the VRAM budget (SPEC 4210-4214); reasons instead of errors for 'no'.

        ``tp_degree`` > 1: ``shard_plan`` has one entry per rank (each needs the same: its slice of
        the split weights, the replicated ones, 1/T of the KV cache, scratch and margin); this
        worker checks its own rank's memory only. A model that cannot split T ways is refused
        (MODEL_LOAD_FAILED, as its load would be), not reported infeasible.
        """
        if self.engine is None or self.ecp is None:
            raise WorkerError("the device is not open yet", code=ErrorCode.WORKER_NOT_READY)
        options = self._load_options(self.config.model_root, None)
        validated = await asyncio.to_thread(validate_model, model_ref, options, None, self._loader_log)
        reasons = [r.message for r in match(validated.mcd, self.ecp).rejections]
        own = self.config.tp_rank if tp_degree == self.config.tp_degree else None
        if own is None:
            reasons.append(
                f"this worker was started with --tp-degree {self.config.tp_degree}: a commit of a shard of "
                f"{tp_degree} needs workers started with --tp-degree {tp_degree} (shard_plan shows what each needs)"
            )
        try:
            vram_plan = await asyncio.to_thread(
                partial(self.engine.plan, validated.gguf, self.config.kv_cache_size_mb, tp_degree=tp_degree)
            )
        except WorkerError as e:
            if e.code in FATAL_CODES:
                self.fail(e)
            raise
        required, free = int(vram_plan.required_bytes), int(vram_plan.free_bytes)
        if self.handle is not None and self.handle.digest != validated.digest:
            reasons.append(f"this worker already holds model {self.handle.model_ref!r} (SPEC 4022)")
        elif self.handle is None and required > free and self.config.dev_mode:
            reasons.append(f"needs {required} bytes of host memory (development mode: nothing goes to VRAM), {free} available")
        elif self.handle is None and required > free:
            reasons.append(f"needs {required} bytes of device memory, {free} free on device {self.config.gpu_device}")
        return {
            "feasible": not reasons,
            "dev_mode": self.config.dev_mode,  # true: the vram_* fields count host memory (SPEC "GPU only")
            "vram_required": required,
            "vram_free": free,
            "shard_plan": self._shard_plan(vram_plan.as_dict(), required, tp_degree, own),
            "reasons": reasons,
            "digest": validated.digest,
            "mcd": validated.mcd.to_dict(),
            "plan": vram_plan.as_dict(),
        }

    def _shard_plan(self, plan: dict[str, Any], required: int, tp_degree: int, own: int | None) -> list[dict[str, Any]]:
        """One entry per rank; ``gpu_device`` is known for this worker's own rank only (each rank is a process)."""
        keys = ("weights_bytes", "weights_sharded_bytes", "weights_replicated_bytes", "kv_cache_bytes")
        return [
            {
                "shard_index": rank,
                "gpu_device": self.config.gpu_device if rank == own else None,
                "vram_bytes": int(plan.get("resident_bytes", required)),
                "load_peak_bytes": int(plan.get("load_peak_bytes", required)),
                **{k: int(plan[k]) for k in keys if k in plan},
            }
            for rank in range(tp_degree)
        ]

    def _seal_check_in_step(self, admitted: int, *, beside_steps: bool) -> _TimedSealCheck:
        """The engine loop's hook: one seal verification for the jobs waiting to be admitted (SPEC 4121, issue 8).

        Runs on the engine thread: the fingerprint starts on the device beside the running jobs'
        steps (``beside_steps``: in a bounded share of the GPU; else at full speed); the loop admits
        the jobs it covers once it passed (loop.py ``_seal_gate``). A failure
        fails them with SEAL_VERIFICATION_FAILED and stops the worker (fatal, 4122); the metric is
        the engine thread's time in both halves (the device computes the fingerprint meanwhile).
        """
        sealed = self.sealed
        if sealed is None:
            raise WorkerError("no sealed model", code=ErrorCode.WORKER_NOT_READY)
        t0 = time.perf_counter()
        pending = sealed.verify_seal_start(beside_steps=beside_steps)
        return _TimedSealCheck(pending, (time.perf_counter() - t0) * 1000, self._seal_checked)

    def _seal_checked(self, ms: float) -> None:
        self.last_seal_ms = ms
        self.metrics.seal_verify_ms.observe(ms)

    async def verify_seal(self) -> float:
        """SPEC 4121/4245: re-verify before every execute; failure is fatal for the worker (4122)."""
        sealed = self.sealed
        if sealed is None:
            raise WorkerError("no sealed model", code=ErrorCode.WORKER_NOT_READY)
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(sealed.verify_seal)
        except WorkerError as e:
            if e.code in FATAL_CODES:
                self.fail(e)
            raise
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.seal_verify_ms.observe(ms)
        return ms

    # --- readiness -----------------------------------------------------------------------

    def ready_body(self) -> dict[str, Any]:
        """The readiness callback (SPEC "Callback"): {worker_id, model_ref, vram_bytes, uri, ecp} + mode."""
        handle = self.handle
        assert handle is not None and self.ecp is not None
        return {
            "worker_id": self.config.worker_id,
            "pool_id": self.config.pool_id,
            "model_ref": handle.model_ref,
            "vram_bytes": 0 if self.config.dev_mode else (self.model.vram_bytes() if self.model else 0),
            "uri": self.uri,
            "ecp": self.ecp.to_dict(),
            "device": self.config.device,
            "dev_mode": self.config.dev_mode,
            "handle": handle.public(),
        }

    async def announce_ready(self) -> None:
        """Tell the pool manager, then accept work; without a callback URL the worker is standalone."""
        if self.callback is None:
            logs.event("standalone", "No --callback-url: running standalone, nobody is told this worker is ready.")
        else:
            await self.callback.ready(self.ready_body())
        if self._state == State.LOADING or self._state == State.STARTING:
            self.set_state(State.READY)
            handle = self.handle
            logs.event(
                "ready",
                "Ready: serving {model_ref} on {uri} in CPU development mode; work is accepted from now on."
                if self.config.dev_mode else
                "Ready: serving {model_ref} from GPU {gpu_device} on {uri}; work is accepted from now on.",
                model_ref=handle.model_ref if handle else None, uri=self.uri, dev_mode=self.config.dev_mode,
                gpu_device=self.config.gpu_device,
            )

    def after_commit(self) -> None:
        """A commit over HTTP: announce in the background; a failed announcement stops the worker."""
        self._spawn(self._announce_or_fail())

    async def _announce_or_fail(self) -> None:
        try:
            await self.announce_ready()
        except WorkerError as e:
            self.fail(e)

    async def abandon_group(self, error: WorkerError) -> None:
        """A tensor-parallel rank that exits before its load joined the group tells the others why
        (the engine posts it where they wait), so they stop now instead of after the join timeout."""
        if self.config.tp_degree > 1 and self.engine is not None:
            why = f"{self.config.worker_id}: {error.code.value}: {error.message}"
            await asyncio.to_thread(self.engine.abandon_group, why)

    async def report_failure(self, error: WorkerError) -> None:
        """Status callback carrying the error code (SPEC 4961); best-effort, sent once per process.

        Every caller (the fatal path, serve()'s startup-failure path) awaits the same report,
        so the first cause is the one sent and nobody returns before it was delivered or gave up.
        """
        if self.callback is None:
            return
        if self._report is None:
            self._report = asyncio.get_running_loop().create_task(self._send_status(error))
        await asyncio.shield(self._report)

    async def _send_status(self, error: WorkerError) -> None:
        assert self.callback is not None
        await self.callback.status(
            {
                "worker_id": self.config.worker_id,
                "pool_id": self.config.pool_id,
                "state": State.STOPPED.value,
                "uri": self.uri,
                "error": error.to_dict(),
                "dev_mode": self.config.dev_mode,
            }
        )

    # --- failure and shutdown ------------------------------------------------------------

    def fail(self, error: WorkerError) -> None:
        """Fatal error (SPEC 4032, 4122, 4960-4961): this process can no longer be trusted to serve.

        At once: state ``stopped`` (new work gets 503) and the in-flight job is stopped with the
        error's code. Then, in the background: the status callback, a short wait for the job's
        stream to send its error event, and the request to stop, after which serve() exits 1 so the
        supervisor restarts the worker. The watchdog (``force_exit`` with code 1) bounds it all.
        """
        if self._state == State.STOPPED:
            return
        if error.code == ErrorCode.CUDA_ERROR:
            self.metrics.cuda_errors.inc()
        self.exit_code = 1
        logs.event(
            "fatal", "Fatal {code}: {error}. The worker stops and will exit with code {exit_code} so that its "
            "supervisor restarts it.",
            level=logging.ERROR, code=error.code.value, error=error.message, exit_code=self.exit_code,
        )
        self.set_state(State.STOPPED)
        self._arm_watchdog(self.config.shutdown_timeout_sec)  # whatever the callback or the engine does
        for job in self.scheduler.active_jobs():
            job.request_stop(error.code, error.message)
        self._spawn(self._report_and_stop(error))

    async def _report_and_stop(self, error: WorkerError) -> None:
        try:
            await self.report_failure(error)
            await self.scheduler.wait_idle(shutdown_grace(self.config.shutdown_timeout_sec))
        finally:
            self.stop_requested.set()

    def request_shutdown(self, reason: str) -> None:
        """SIGTERM or POST /shutdown: drain once; later requests are no-ops."""
        if self._draining is not None or self._state == State.STOPPED:
            return
        timeout = self.config.shutdown_timeout_sec
        self._arm_watchdog(timeout)
        self.set_state(State.DRAINING)  # at once: from this call on, new work gets 503
        logs.event(
            "draining", "Draining ({reason}): new work gets 503; a running job has up to {timeout_sec:.1f} s to finish.",
            reason=reason, timeout_sec=timeout - shutdown_grace(timeout),
        )
        self._draining = asyncio.get_running_loop().create_task(self._drain(timeout))

    async def _drain(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        grace = shutdown_grace(timeout)
        if self.scheduler.active is not None and not await self.scheduler.wait_idle(deadline - grace - loop.time()):
            for job in self.scheduler.active_jobs():
                job.request_stop(ErrorCode.CANCELLED, "worker is shutting down")
                logs.event(
                    "job_cancel", "Cancelled job {job_id}: it did not finish within the shutdown timeout.",
                    level=logging.WARNING, job_id=job.job_id, reason="shutdown",
                )
            await self.scheduler.wait_idle(deadline - 0.75 * grace - loop.time())
        self.stop_requested.set()

    def _arm_watchdog(self, timeout: float) -> None:
        """The process never outlives its shutdown timeout, whatever the engine does (SPEC 4972)."""
        if self._watchdog is not None:
            return

        def _force() -> None:
            logs.event(
                "shutdown", "Still running {timeout_sec:g} s after the stop began: exiting now with code {exit_code}.",
                level=logging.ERROR, exit_code=self.exit_code, timeout_sec=timeout,
            )
            logs.flush()
            self._force_exit(self.exit_code)

        self._watchdog = threading.Timer(timeout, _force)
        self._watchdog.daemon = True
        self._watchdog.start()

    async def close(self) -> None:
        """Release the resident model and the device (VRAM) once no job runs."""
        if self.scheduler.active is not None:
            logs.event(
                "close_skipped", "A job is still running on the device; leaving its release to process exit.",
                level=logging.WARNING,
            )
            return
        sealed, engine = self.sealed, self.engine
        self.sealed = None
        self.engine = None
        for what, release in (("model", sealed.close if sealed else None), ("device", engine.close if engine else None)):
            if release is None:
                continue
            try:
                await asyncio.to_thread(release)
            except Exception as e:  # noqa: BLE001 - e.g. a broken CUDA context after a fatal error
                logs.event(
                    "release_failed", "Releasing the {reason} failed ({exc_type}); process exit frees it instead.",
                    level=logging.ERROR, exc=e, reason=what,
                )
        self.metrics.vram_bytes.set(0)

    def finish(self) -> None:
        """Last step of a clean exit: stopped, logged, watchdog disarmed."""
        self.set_state(State.STOPPED)
        if self._watchdog is not None:
            self._watchdog.cancel()
        logs.event(
            "shutdown",
            "Worker stopped cleanly; exit code {exit_code}." if self.exit_code == 0 else
            "Worker stopped after a fatal error; exit code {exit_code} tells the supervisor to restart it.",
            level=logging.INFO if self.exit_code == 0 else logging.ERROR, exit_code=self.exit_code,
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def shutdown_grace(timeout: float) -> float:
    """The tail of the shutdown timeout kept after the job's own time.

    Its first quarter is for a cancelled job to stop, the second for the HTTP server to close
    its connections, the rest for releasing the device; the watchdog fires at the very end.
    """
    return min(5.0, timeout * 0.25)
