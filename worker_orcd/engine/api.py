"""THE GPU boundary (SPEC 4400): open device, plan, load, generate, fingerprint, attest, usage, close.

Everything the host layer may call on the engine is here (declared as Protocols in
``engine/interface.py``), and every failure leaves as a ``WorkerError`` with a
stable code: never a raw torch exception, never a device pointer. One ``Engine``
per process (one device); one ``ResidentModel`` per loaded shard. The engine
imports no host module: the host opens and verifies the file, hands the engine
the open file and the digest to re-hash against, and seals over the fingerprint
the engine computes (``worker_orcd.residency``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import torch

from ..errors import ErrorCode, InvalidParams, WorkerError
from ..gguf import GGUFFile
from . import attest as attest_mod
from . import ops
from .config import ModelConfig, model_config
from .device import DeviceContext, device_errors, open_device
from ..batching.loop import BeforeAdmit, Cancel, EngineLoop, LoopObserver
from ..batching.step import PendingStep, Sampled, StepBatch
from .events import GenerationEnd, SamplingParams, TokenEvent
from .kv_cache import check_capacity
from .model import Model
from .paged_kv import PagedKVCache, kv_tokens
from .paged_kv import max_seq_len as paged_max_seq_len
from .runner import ModelRunner
from .plan import VramPlan, plan_vram
from .tp_plan import TPSpec, shard_config
from .shard import ShardSink, shard_layout
from .upload import LoadStats, UploadThread, dense_file_bytes, upload
from .weights import ModelWeights, bind, make_planar, plan_planar, resident_dtype, weight_layout

__all__ = ["Engine", "GenerationEnd", "ResidentModel", "SamplingParams", "TokenEvent", "VramPlan"]

log = logging.getLogger("worker_orcd.engine")

# Tokens per step (decode rows + prefill chunks): bounds activation memory (SPEC 4421) and how long a
# prompt may hold the running streams back in one step (p99 inter-token latency under load).
PREFILL_CHUNK_CUDA = 512
# ... and while streams decode: prompt chunks arriving under load stretch a token gap less. 7B Q4_K_M,
# 64 clients, H200 (run_h200.sh itl, seventh session): 384 -> 6,068 tok/s, p99 ITL 20.9 ms; 256 -> 6,044,
# 17.6 ms; 192 -> 5,487, 17.2 ms (TTFT p50 85 / 103 / 141 ms).
MIXED_STEP_TOKENS_CUDA = 256
# programs of a seal check's fingerprint beside running steps (ChecksumPlan.digest; None = one per
# tile, as a check with nothing else running takes):
# 16 read ~0.2 TB/s, so the steps beside it barely slow (7B dense on the H200, 64 clients: p99 gap
# 15.1 -> 12.9 ms with checks at most every 100 ms; a check then takes ~71 ms: RESULTS tenth session)
SEAL_CHECK_PROGRAMS: int | None = 16
RESIDENT_WEIGHTS = ("dense", "quantized", "quantized-half2")  # Engine(resident_weights=...)
PREFILL_CHUNK_CPU = 256  # the CPU reference attention materialises [Hq, chunk, S] scores
# Default batch: as many jobs of this many tokens as the KV pool holds, capped.
TYPICAL_REQUEST_TOKENS = 1024
MAX_BATCH_CAP_CUDA = 128
MAX_BATCH_CAP_CPU = 8


@dataclass(frozen=True)
class BatchingOptions:
    """How the engine loop batches (from the host's configuration)."""

    max_batch: int
    token_budget: int
    mixed_budget: int | None = None  # tokens of a step that also carries decode rows (scheduler.py)
    before_admit: BeforeAdmit | None = None  # the host's seal check (loop.py)
    observer: LoopObserver | None = None
    seal_check_interval_ms: float = 0.0  # while jobs run, seal checks start at most this often (loop.py)


def default_max_batch(pool_tokens: int, dev_mode: bool) -> int:
    cap = MAX_BATCH_CAP_CPU if dev_mode else MAX_BATCH_CAP_CUDA
    return max(1, min(cap, pool_tokens // TYPICAL_REQUEST_TOKENS))
_U64 = 1 << 64


def _check_params(p: SamplingParams) -> None:
    """The engine's own guard: the host validates requests first, but nothing bad crosses unchecked."""
    if not isinstance(p, SamplingParams):
        raise InvalidParams(f"params must be SamplingParams, got {type(p).__name__}")

    def num(name: str, value: object, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidParams(f"{name} must be a finite number, got {value!r}")
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise InvalidParams(
                f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {value!r}"
            )

    def integer(name: str, value: object, lo: int, hi: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidParams(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")

    integer("max_tokens", p.max_tokens, 1, 1 << 31)
    num("temperature", p.temperature, 0.0, 2.0)  # SPEC 4300; the sampler's own range
    integer("top_k", p.top_k, 0, 1 << 31)
    num("top_p", p.top_p, 0.0, 1.0, lo_open=True)
    num("min_p", p.min_p, 0.0, 1.0, hi_open=True)
    num("repetition_penalty", p.repetition_penalty, 0.0, 100.0, lo_open=True)
    integer("seed", p.seed, 0, _U64 - 1)
    for t in p.stop_ids:
        integer("stop_ids[]", t, 0, 1 << 31)


# warm-up and graph capture run beside the upload (upload.UploadThread) when the slots dequantized at load
# (norms, biases; every matrix under the dense residency) hold at most this many file bytes: those wait raw
# in VRAM until the upload ends
OVERLAP_DENSE_BYTES = 256 << 20


class ResidentModel:
    """A model resident on the device: its runner (paged KV, decode graphs) and the engine loop
    that batches every job submitted through ``generate`` (continuous batching, issue 8).

    It owns every device buffer of the model until ``close``; it computes the fingerprint of its
    weights but does not seal or verify it (the host does, SPEC 4121)."""

    def __init__(
        self,
        engine: Engine,
        cfg: ModelConfig,
        weights: ModelWeights,
        kv: PagedKVCache,
        runner: ModelRunner,
        fingerprint: ops.Fingerprint,
        name: str,
        stats: LoadStats,
        vram_bytes: int,
        batching: BatchingOptions,
        tp: Any = None,
    ) -> None:
        self._engine = engine
        self.tp = tp  # tensor_parallel.TPGroup of this shard, or None (tp=1)
        self.config = cfg
        self._weights = weights
        self._kv = kv
        self.runner = runner
        self._fingerprint = fingerprint
        self.name = name
        self.load_stats = stats
        self.load_stages: dict[str, float] = {}  # seconds per load stage (Engine.load)
        self._vram_bytes = vram_bytes
        self.batching = batching
        self._closed = False
        step_runner: Any = runner
        if tp is not None and tp.rank == 0:
            from .tensor_parallel import LeaderRunner

            step_runner = LeaderRunner(runner, tp)  # rank 0 broadcasts every step (members never use the loop)
        self._loop = EngineLoop(
            _BoundRunner(step_runner, engine.ctx), max_batch=batching.max_batch, token_budget=batching.token_budget,
            mixed_budget=batching.mixed_budget, before_admit=batching.before_admit, observer=batching.observer,
            seal_check_interval_s=batching.seal_check_interval_ms / 1e3,
        )

    @property
    def max_seq_len(self) -> int:
        return self.runner.max_seq_len

    @property
    def max_batch(self) -> int:
        return self.batching.max_batch

    @property
    def gpu_device(self) -> int:
        return self._engine.ctx.index

    @property
    def graph_captured(self) -> bool:
        return bool(self.runner.graphs)

    @property
    def seals_per_step(self) -> bool:
        """True: the engine loop runs the host's seal check before it admits jobs (SPEC 4121)."""
        return self.batching.before_admit is not None

    def stats(self) -> dict[str, int]:
        return {**self._loop.stats(), "max_batch": self.batching.max_batch}

    def tokens_per_second(self) -> float:
        return self._loop.tokens_per_second()

    def _require_open(self) -> None:
        if self._closed:
            raise WorkerError(f"model {self.name} was closed", code=ErrorCode.WORKER_NOT_READY)

    # --- inference ----------------------------------------------------------------------------

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: Cancel = None
    ) -> Iterator[TokenEvent | GenerationEnd]:
        """Validate now (before any work), queue the job; iterate for TokenEvents then one GenerationEnd.

        Thread-safe: many generations run at once, batched by the engine loop.
        """
        return self._loop.submit(self._checked(prompt_ids, params), params, cancel)

    def generate_into(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: Cancel, sink: Callable[[Any], None]
    ) -> None:
        """``generate`` without a reader thread: validate now, then ``sink`` gets each TokenEvent, then a
        GenerationEnd or an exception, on the engine thread (it must only hand them over, quickly)."""
        self._loop.submit_to(self._checked(prompt_ids, params), params, cancel, sink)

    def _checked(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        self._require_open()
        if self.tp is not None and self.tp.rank != 0:
            raise WorkerError(f"rank {self.tp.rank} of tensor-parallel group {self.tp.spec.group_id} takes no jobs; "
                              "rank 0 serves them", code=ErrorCode.WORKER_NOT_READY)
        _check_params(params)
        ids = list(prompt_ids)
        vocab = self.config.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidParams(f"prompt token {i} is {t!r}, not a token id in [0, {vocab})")
        check_capacity(len(ids), params.max_tokens, self.max_seq_len)
        return ids

    # --- residency -----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Checksum of the resident weight bytes, recomputed where they live on every call: what the
        host seals at load and compares before execution (SPEC 4121)."""
        self._require_open()
        with device_errors("fingerprint", self._engine.ctx.index), torch.no_grad():
            self._engine.ctx.bind_thread()
            return self._fingerprint.hex()

    def fingerprint_start(self, *, beside_steps: bool = False) -> _DevicePending:
        """``fingerprint`` started behind the steps already queued, on the fingerprint's side stream
        (beside the steps queued after it; no host wait now). Called on the engine-loop thread."""
        self._require_open()
        with device_errors("fingerprint", self._engine.ctx.index), torch.no_grad():
            self._engine.ctx.bind_thread()
            programs = SEAL_CHECK_PROGRAMS if beside_steps else None
            return _DevicePending(self._fingerprint.start(programs), self._engine.ctx.index)

    def attest(self) -> dict[str, Any]:
        """Where every weight, KV-cache and scratch buffer lives, per the CUDA runtime (SPEC 4100-4101)."""
        self._require_open()
        groups = {
            "weights": [self._weights.arena],
            "kv_cache": [self._kv.k, self._kv.v],
            "scratch": self.runner.buffers(),
        }
        with device_errors("attestation", self._engine.ctx.index):
            return attest_mod.attest_buffers(self._engine.ctx, groups)

    def vram_bytes(self) -> int:
        """Device bytes this model holds (0 in CPU development mode: nothing is in VRAM)."""
        return self._vram_bytes

    def follow(self, before_job: Callable[[], None] | None = None) -> str:
        """A tensor-parallel member (rank > 0): run the steps rank 0 broadcasts until it ends the group.

        Returns why it ended (a drain on rank 0); raises TP_GROUP_FAILED when rank 0 is lost.
        ``before_job`` is the host's seal check, run before every step that starts a job."""
        self._require_open()
        if self.tp is None or self.tp.rank == 0:
            raise WorkerError("only a tensor-parallel member (rank > 0) follows", code=ErrorCode.INVALID_PARAMS)
        from .tensor_parallel import follow

        with device_errors("generation", self._engine.ctx.index), torch.no_grad():
            self._engine.ctx.bind_thread()
            return follow(self.runner, self.tp, before_job)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.close()
        self._loop.runner = None  # type: ignore[assignment]  # the loop must not keep the device buffers alive
        if self.tp is not None:
            self.tp.close()  # rank 0: the members stop too
        self.runner.close()
        del self.runner, self._kv, self._weights, self._fingerprint, self._loop
        self._engine._forget(self)


class _BoundRunner:
    """The runner as the engine loop sees it: device errors become typed WorkerErrors (CUDA_ERROR is fatal)."""

    def __init__(self, runner: ModelRunner, ctx: DeviceContext) -> None:
        self._runner = runner
        self._ctx = ctx
        self._bound = False
        self.block_size = runner.block_size
        self.num_blocks = runner.num_blocks
        self.max_seq_len = runner.max_seq_len
        self.vocab_size = runner.vocab_size

    def step(self, batch: StepBatch) -> list[Sampled]:
        with device_errors("generation", self._ctx.index):
            if not self._bound:
                self._ctx.bind_thread()
                self._bound = True
            return self._runner.step(batch)

    def launch(self, batch: StepBatch) -> PendingStep:
        with device_errors("generation", self._ctx.index):
            if not self._bound:
                self._ctx.bind_thread()
                self._bound = True
            return _BoundPending(self._runner.launch(batch), self._ctx.index)


class _BoundPending:
    def __init__(self, pending: PendingStep, index: int) -> None:
        self._pending = pending
        self._index = index

    def result(self) -> list[Sampled]:
        with device_errors("generation", self._index):
            return self._pending.result()


class _DevicePending:
    """A started fingerprint whose device errors become typed WorkerErrors (CUDA_ERROR is fatal)."""

    def __init__(self, pending: ops.PendingFingerprint, index: int) -> None:
        self._pending = pending
        self._index = index

    def ready(self) -> bool:
        with device_errors("fingerprint", self._index):
            return self._pending.ready()

    def __call__(self) -> str:
        with device_errors("fingerprint", self._index):
            return self._pending()


class Engine:
    """The process's GPU layer: one device, the models loaded on it."""

    def __init__(self, ctx: DeviceContext, resident_weights: str = "dense", tp: TPSpec | None = None) -> None:
        if resident_weights not in RESIDENT_WEIGHTS:
            raise InvalidParams(f"resident_weights must be one of {', '.join(RESIDENT_WEIGHTS)}, got {resident_weights!r}")
        self.ctx = ctx
        self.tp = tp  # this process's tensor-parallel membership; the group is joined at load
        self._joined = False  # load tried to join the group (abandon_group has nothing to tell then)
        # quantized: matrices stay GGUF blocks in VRAM (smallest; the fused kernels are exact but not yet
        # as fast as the dense fp16 path); dense: dequantized once at load (fastest today). CPU: dense fp32.
        self.quantized = resident_weights.startswith("quantized") and not ctx.dev_mode
        # quantized-half2: Q4_K/Q6_K matrices dequantized in packed half2 arithmetic by every kernel (fp16
        # models; values differ from ggml's by the fp16 rounding of the scales): 7B Q4_K_M decode steps
        # 6.71 -> 5.92 ms at B = 1 on the H200 (benchmarks/RESULTS.md, ninth session).
        self.half2 = self.quantized and resident_weights == "quantized-half2"
        self.resident_weights = resident_weights if self.quantized else "dense"
        self._models: list[ResidentModel] = []

    @classmethod
    def open(
        cls, device: Literal["cuda", "cpu"] = "cuda", gpu_device: int = 0, resident_weights: str = "dense",
        tp: TPSpec | None = None,
    ) -> Engine:
        with device_errors("opening the device", gpu_device):
            return cls(open_device(device, gpu_device), resident_weights, tp)

    @property
    def dev_mode(self) -> bool:
        return self.ctx.dev_mode

    def describe(self) -> dict[str, Any]:
        return self.ctx.describe()

    @property
    def prefill_chunk(self) -> int:
        return PREFILL_CHUNK_CPU if self.ctx.dev_mode else PREFILL_CHUNK_CUDA

    def plan(
        self, gguf: GGUFFile, kv_cache_mb: int | None = None, *, free_bytes: int | None = None, tp_degree: int = 1
    ) -> VramPlan:
        """What loading ``gguf`` needs against free device memory (SPEC 4210, 4214); allocates nothing.

        ``tp_degree`` > 1: what one rank of a group of that size needs (``plan.plan_vram``)."""
        cfg = model_config(gguf)
        free = self.ctx.mem_get_info()[0] if free_bytes is None else free_bytes
        dtype = resident_dtype(cfg, self.ctx)
        return plan_vram(
            cfg, gguf, dtype, kv_cache_mb, free, self.ctx.index, self.prefill_chunk, self.ctx.dev_mode, self.quantized,
            tp_degree=tp_degree,
        )

    def load(
        self,
        gguf: GGUFFile,
        model_file: BinaryIO,
        *,
        digest: str | None = None,
        on_digest: Callable[[str], None] | None = None,
        name: str = "model",
        kv_cache_mb: int | None = None,
        capture_graph: bool = True,
        max_batch: int | None = None,
        prefill_chunk: int | None = None,
        mixed_step_tokens: int | None = None,
        before_admit: BeforeAdmit | None = None,
        observer: LoopObserver | None = None,
        progress: Callable[[int, int], None] | None = None,
        on_fatal: Callable[[WorkerError], None] | None = None,
        seal_check_interval_ms: float = 0.0,
    ) -> ResidentModel:
        """Plan, stream + dequantize ``model_file`` into VRAM, re-hash, capture the decode graphs, fingerprint.

        ``model_file`` is the open file ``gguf`` was parsed from; its bytes must hash to ``digest``
        (the SHA-256 the host verified), or nothing loads (SPEC 4113). Without ``digest`` (the
        one-pass load) ``on_digest`` gets the SHA-256 computed while streaming, right after the
        upload and before any job runs on the weights (on one device, when the slots dequantized at
        load are small -- the quantized residencies -- the warm-up and graph capture run beside the
        upload: they need the weights' addresses only, and their outputs are dropped;
        ``upload.UploadThread``); it is the host's check and raises to refuse
        the model. The header bytes streamed must be those ``gguf`` was parsed from. ``name`` labels logs and errors.
        ``max_batch`` (default: what the KV pool holds for typical requests, capped) bounds the
        jobs running at once; ``prefill_chunk`` the tokens of one step, ``mixed_step_tokens`` those of a
        step with decode rows (default: MIXED_STEP_TOKENS_CUDA on a GPU, ``prefill_chunk`` on the CPU); ``before_admit`` is the
        host's seal check, started for the jobs waiting unchecked (at most once per ``seal_check_interval_ms``
        while jobs run; loop.py). ``progress(bytes_done, bytes_total)``
        is called after every uploaded chunk of tensor data (what ``/health`` shows while loading);
        once it reports all bytes, warm-up and graph capture follow. Its exceptions are ignored.
        ``on_fatal`` hears (on an engine thread) of a failure outside any job: a tensor-parallel
        peer lost while idle. With a ``tp`` spec this process joins its group first, then streams and
        re-hashes the whole file as for tp=1 but keeps only its shard (``shard.ShardSink``).
        """
        if not name:
            raise InvalidParams("name must be non-empty")
        if (digest is None) == (on_digest is None):
            raise InvalidParams("load needs either the verified digest or an on_digest check (one-pass load), not both")
        for key, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                           ("mixed_step_tokens", mixed_step_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidParams(f"{key} must be a positive integer, got {value!r}")
        if isinstance(seal_check_interval_ms, bool) or not isinstance(seal_check_interval_ms, (int, float)) \
                or not 0 <= seal_check_interval_ms <= 60_000:
            raise InvalidParams(f"seal_check_interval_ms must be a number in [0, 60000], got {seal_check_interval_ms!r}")
        g = gguf
        cfg = model_config(g)
        dtype = resident_dtype(cfg, self.ctx)
        plan = self.plan(g, kv_cache_mb, tp_degree=self.tp.degree if self.tp is not None else 1)
        if self.tp is None:
            plan.require()  # in a group: after joining, so the others hear of it (below)
        pool = kv_tokens(cfg, dtype, kv_cache_mb, self.ctx.dev_mode)
        s_max = paged_max_seq_len(cfg, dtype, kv_cache_mb, self.ctx.dev_mode)
        batch = max_batch or default_max_batch(pool, self.ctx.dev_mode)
        budget = max(prefill_chunk or self.prefill_chunk, batch)  # every running job gets a row each step
        dev = self.ctx.torch_device
        idx = self.ctx.index
        allocated_before = torch.cuda.memory_allocated(idx) if not self.ctx.dev_mode else 0
        arena: torch.Tensor | None = None
        weights: ModelWeights | None = None
        kv: PagedKVCache | None = None
        runner: ModelRunner | None = None
        fp: ops.Fingerprint | None = None
        group: Any = None
        sink: ShardSink | None = None
        stages: dict[str, float] = {}  # seconds per load stage (the log line below; ResidentModel.load_stages)
        mark = time.perf_counter()

        def stage(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            stages[name] = now - mark
            mark = now

        try:
            if self.tp is not None:
                from . import tensor_parallel

                self._joined = True  # joined or refused: either way no failure report before joining
                group = tensor_parallel.join(self.tp, self.ctx.kind)
                # what fails from here on is told to the others (group.abort below): before anyone uploads
                mcfg = shard_config(cfg, self.tp.degree)  # refuses heads / FFN that do not split
                plan.require()
                group.agree({"kv_tokens": pool, "max_seq_len": s_max, "max_batch": batch, "token_budget": budget,
                             "resident_weights": self.resident_weights, "dtype": str(dtype)},
                            stage="planned")
                stage("join")
            with device_errors("loading the model", idx), torch.no_grad():
                self.ctx.bind_thread()
                lay = weight_layout(cfg, g, dtype, quantized=self.quantized)
                if group is not None or dense_file_bytes(g, lay) > OVERLAP_DENSE_BYTES:  # one stage after another
                    if group is not None:  # this rank's GGUF blocks or dense values only, sliced as they stream
                        arena = torch.empty(shard_layout(lay, cfg, group.size).total_bytes, dtype=torch.uint8, device=dev)
                        sink = ShardSink(arena, lay, cfg, group.rank, group.size)
                    else:  # the weights dequantized as they stream
                        arena = torch.empty(lay.total_bytes, dtype=torch.uint8, device=dev)
                    stats = upload(model_file, g, lay, arena, digest, self.ctx, progress=progress, sink=sink)
                    stage("upload")
                    if sink is not None:
                        lay = sink.finish()
                        self._release_cached()  # the staging blocks, before the KV pool is allocated
                    if on_digest is not None:
                        on_digest(stats.digest)  # the host's verdict before anything runs on these bytes
                    if self.quantized:
                        make_planar(arena, lay, half2=self.half2)  # a fixed permutation of the verified bytes, before the seal
                    if group is None:
                        model: Any = Model(cfg, bind(arena, lay, cfg, half2=self.half2))
                    else:
                        model = tensor_parallel.TPModel(mcfg, bind(arena, lay, mcfg, half2=self.half2), group)
                    weights, kv, runner = self._warm(model, pool, dtype, s_max, batch, budget, capture_graph, stage)
                else:
                    # zeroed on a GPU: the warm-up below runs on whatever the arena holds until the bytes arrive
                    new = torch.empty if self.ctx.dev_mode else torch.zeros
                    arena = new(lay.total_bytes, dtype=torch.uint8, device=dev)
                    if self.quantized:
                        plan_planar(lay, half2=self.half2)  # the order make_planar gives the bytes, for bind
                    streaming = UploadThread(model_file, g, lay, arena, digest, self.ctx, progress)
                    streaming.start()
                    try:  # warm-up and graph capture need the weights' addresses only: they overlap the upload
                        model = Model(cfg, bind(arena, lay, cfg, half2=self.half2))
                        weights, kv, runner = self._warm(model, pool, dtype, s_max, batch, budget, capture_graph, stage)
                    except BaseException as exc:
                        # evidence for a capture that fails only beside the upload (18th session: one GPU-suite run
                        # saw a capture invalidated here, cause not established)
                        log.warning("model warm-up/graph capture failed while the weights' upload %s: %s",
                                    "was still streaming" if streaming.is_alive() else "had finished", exc)
                        streaming.abandon()
                        raise
                    stats = streaming.result()
                    stage("upload-wait")  # the upload itself: stats.seconds, from before bind+kv
                    if on_digest is not None:
                        on_digest(stats.digest)  # the host's verdict before any job runs on these bytes
                    if self.quantized:
                        make_planar(arena, lay, half2=self.half2)  # a fixed permutation of the verified bytes, before the seal
                        self.ctx.synchronize()
                        stage("repack")
                fp = ops.Fingerprint([arena])
                self.ctx.synchronize()
                stage("fingerprint-plan")
            if group is not None:
                group.agree({"digest": stats.digest, "blocks": kv.num_blocks, "block_size": kv.block_size,
                             "max_seq_len": s_max, "max_batch": batch, "token_budget": budget})
                if on_fatal is not None:
                    group.on_failure(on_fatal)
                group.start_heartbeat()
        except BaseException as e:
            if group is not None:
                group.abort(f"{type(e).__name__}: {e}")
            if runner is not None:
                runner.close()
            arena = kv = runner = weights = fp = sink = None  # drop every device buffer of the failed load now
            self._release_cached()
            raise
        assert arena is not None and weights is not None and kv is not None and runner is not None and fp is not None
        vram = 0 if self.ctx.dev_mode else torch.cuda.memory_allocated(idx) - allocated_before
        cap = mixed_step_tokens if mixed_step_tokens is not None else None if self.ctx.dev_mode else MIXED_STEP_TOKENS_CUDA
        mixed = None if cap is None else max(min(cap, budget), batch)  # never fewer than the decode rows
        options = BatchingOptions(max_batch=batch, token_budget=budget, mixed_budget=mixed,
                                  before_admit=before_admit, observer=observer,
                                  seal_check_interval_ms=float(seal_check_interval_ms))
        rm = ResidentModel(self, cfg, weights, kv, runner, fp, name, stats, vram, options, tp=group)
        rm.load_stages = stages
        self._models.append(rm)
        log.info("model %s load stages (s): %s%s", name, ", ".join(f"{k} {v:.2f}" for k, v in stages.items()),
                 "" if "upload" in stages else f"; the upload beside them {stats.seconds:.2f}")
        log.info(
            "model %s %s: %d bytes in %.2f s (%.2f GB/s), %s, pool=%d tokens, S_max=%d, batch=%d, graphs=%s",
            name,
            "loaded in host memory (CPU development mode, not VRAM)" if self.ctx.dev_mode else "resident in VRAM",
            stats.resident_bytes,
            stats.seconds,
            stats.gb_per_s,
            plan.dtype,
            pool,
            s_max,
            batch,
            sorted(runner.graphs),
        )
        return rm

    def _warm(self, model: Any, pool: int, dtype: torch.dtype, s_max: int, batch: int, budget: int,
              capture_graph: bool, stage: Callable[[str], None]) -> tuple[ModelWeights, PagedKVCache, ModelRunner]:
        """The KV pool and runner of ``model``, warmed up (kernels compiled) and its graphs captured."""
        kv = PagedKVCache.allocate(model.cfg, pool, dtype, self.ctx.torch_device)
        runner = ModelRunner(model, kv, self.ctx.torch_device, s_max, batch, max_tokens=budget)
        try:
            self.ctx.synchronize()
            stage("bind+kv")
            runner.warmup()
            self.ctx.synchronize()
            stage("warmup")
            if capture_graph:
                runner.capture()
            stage("graphs")
        except BaseException:
            runner.close()
            raise
        return model.w, kv, runner

    def abandon_group(self, reason: str) -> bool:
        """This process fails before its load joined the tensor-parallel group (the host could not
        validate or read its model, ...): tell the others now rather than let them wait out the join
        timeout. Nothing to do without a group, or once joined (a failed load aborts the group itself)."""
        if self.tp is None or self._joined:
            return False
        from . import tensor_parallel

        self._joined = True  # once
        return tensor_parallel.report_failure_before_join(self.tp, reason)

    def memory(self) -> dict[str, int]:
        free, total = self.ctx.mem_get_info()
        return {
            "free_bytes": free,
            "total_bytes": total,
            "used_bytes": total - free,
            "models_bytes": sum(m.vram_bytes() for m in self._models),
        }

    def _forget(self, model: ResidentModel) -> None:
        if model in self._models:
            self._models.remove(model)
        self._release_cached()

    def _release_cached(self) -> None:
        """Hand freed blocks back to the driver so free VRAM is truthful after a close or failure."""
        if not self.ctx.dev_mode:
            torch.cuda.synchronize(self.ctx.index)
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Release every model's device memory (SPEC 4013, 4970)."""
        for m in list(self._models):
            m.close()
