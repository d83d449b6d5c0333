"""THE GPU boundary (SPEC 4400): open device, plan, load + seal, generate, verify, attest, usage, close.

Everything the host layer may call on the engine is here, typed, and every
failure leaves as a ``WorkerError`` with a stable code: never a raw torch
exception, never a device pointer. One ``Engine`` per process (one device);
one ``ResidentModel`` per loaded shard, running one generation at a time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from ..errors import ErrorCode, InvalidParams, WorkerError
from ..gguf import GGUFFile
from ..loader import ValidatedModel
from ..seal import ModelShardHandle, Sealer
from ..sources import open_model
from . import attest as attest_mod
from . import ops
from .config import ModelConfig, model_config
from .device import DeviceContext, device_errors, open_device
from .generate import Cancel, GenerationEnd, Generator, SamplingParams, TokenEvent
from .kv_cache import KVCache, check_capacity
from .model import Model
from .plan import VramPlan, plan_vram
from .upload import LoadStats, upload
from .weights import ModelWeights, bind, resident_dtype, weight_layout

__all__ = ["Engine", "GenerationEnd", "ResidentModel", "SamplingParams", "TokenEvent", "VramPlan"]

log = logging.getLogger("worker_orcd.engine")

PREFILL_CHUNK_CUDA = 2048  # tokens per prefill forward: bounds activation memory (SPEC 4421)
PREFILL_CHUNK_CPU = 256  # the CPU reference attention materialises [Hq, chunk, S] scores
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


class ResidentModel:
    """A sealed model resident on the device, with its KV cache and captured decode step."""

    def __init__(
        self,
        engine: Engine,
        cfg: ModelConfig,
        weights: ModelWeights,
        kv: KVCache,
        gen: Generator,
        fingerprint: ops.Fingerprint,
        handle: ModelShardHandle,
        sealer: Sealer,
        stats: LoadStats,
        vram_bytes: int,
    ) -> None:
        self._engine = engine
        self.config = cfg
        self._weights = weights
        self._kv = kv
        self._gen = gen
        self._fingerprint = fingerprint
        self.handle = handle
        self._sealer = sealer
        self.load_stats = stats
        self._vram_bytes = vram_bytes
        self._busy = threading.Lock()
        self._closed = False

    @property
    def max_seq_len(self) -> int:
        return self._kv.max_seq_len

    @property
    def graph_captured(self) -> bool:
        return self._gen.graph is not None

    def _require_open(self) -> None:
        if self._closed:
            raise WorkerError(f"model {self.handle.shard_id} was closed", code=ErrorCode.WORKER_NOT_READY)

    # --- inference ----------------------------------------------------------------------------

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: Cancel = None
    ) -> Iterator[TokenEvent | GenerationEnd]:
        """Validate now (before any work), then stream TokenEvents; the last item is GenerationEnd."""
        self._require_open()
        _check_params(params)
        ids = list(prompt_ids)
        vocab = self.config.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidParams(f"prompt token {i} is {t!r}, not a token id in [0, {vocab})")
        check_capacity(len(ids), params.max_tokens, self.max_seq_len)
        return self._stream(ids, params, cancel)

    def _stream(self, ids: list[int], params: SamplingParams, cancel: Cancel) -> Iterator[TokenEvent | GenerationEnd]:
        if not self._busy.acquire(blocking=False):
            raise WorkerError("a generation is already running on this model", code=ErrorCode.WORKER_BUSY)
        try:
            with device_errors("generation", self._engine.ctx.index):
                self._engine.ctx.bind_thread()
                yield from self._gen.run(ids, params, cancel)
        finally:
            self._busy.release()

    # --- seal and residency -------------------------------------------------------------------

    def fingerprint(self) -> str:
        with device_errors("fingerprint", self._engine.ctx.index), torch.no_grad():
            self._engine.ctx.bind_thread()
            return self._fingerprint.hex()

    def verify_seal(self) -> float:
        """Recompute the fingerprint where the weights live and check the HMAC (SPEC 4121); returns ms."""
        self._require_open()
        t0 = time.perf_counter()
        self._sealer.verify(self.handle, self.fingerprint())
        return (time.perf_counter() - t0) * 1e3

    def attest(self) -> dict[str, Any]:
        """Where every weight, KV-cache and scratch buffer lives, per the CUDA runtime (SPEC 4100-4101)."""
        self._require_open()
        groups = {
            "weights": [self._weights.arena],
            "kv_cache": [self._kv.k, self._kv.v],
            "scratch": self._gen.buffers(),
        }
        with device_errors("attestation", self._engine.ctx.index):
            return attest_mod.attest_buffers(self._engine.ctx, groups)

    def vram_bytes(self) -> int:
        """Device bytes this model holds (0 in CPU development mode: nothing is in VRAM)."""
        return self._vram_bytes

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._gen.graph = None
        self._gen.graph_logits = None
        self._gen.pf_graphs.clear()
        self._gen.pf_tokens = self._gen.pf_positions = None
        del self._gen, self._kv, self._weights, self._fingerprint
        self._engine._forget(self)


class Engine:
    """The process's GPU layer: one device, the models loaded on it."""

    def __init__(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self._models: list[ResidentModel] = []

    @classmethod
    def open(cls, device: Literal["cuda", "cpu"] = "cuda", gpu_device: int = 0) -> Engine:
        with device_errors("opening the device", gpu_device):
            return cls(open_device(device, gpu_device))

    @property
    def dev_mode(self) -> bool:
        return self.ctx.dev_mode

    def describe(self) -> dict[str, Any]:
        return self.ctx.describe()

    @property
    def prefill_chunk(self) -> int:
        return PREFILL_CHUNK_CPU if self.ctx.dev_mode else PREFILL_CHUNK_CUDA

    def plan(self, gguf: GGUFFile, kv_cache_mb: int | None = None, *, free_bytes: int | None = None) -> VramPlan:
        """What loading ``gguf`` needs against free device memory (SPEC 4210, 4214); allocates nothing."""
        cfg = model_config(gguf)
        free = self.ctx.mem_get_info()[0] if free_bytes is None else free_bytes
        dtype = resident_dtype(cfg, self.ctx)
        return plan_vram(cfg, gguf, dtype, kv_cache_mb, free, self.ctx.index, self.prefill_chunk, self.ctx.dev_mode)

    def load(
        self,
        model: ValidatedModel,
        *,
        shard_id: str,
        sealer: Sealer,
        kv_cache_mb: int | None = None,
        capture_graph: bool = True,
        shard_index: int = 0,
        total_shards: int = 1,
        model_ref: str | None = None,
    ) -> ResidentModel:
        """Plan, stream + dequantize into VRAM, re-hash, capture the decode graph, fingerprint, seal."""
        if not shard_id:
            raise InvalidParams("shard_id must be non-empty")
        g = model.gguf
        cfg = model_config(g)
        dtype = resident_dtype(cfg, self.ctx)
        plan = self.plan(g, kv_cache_mb)
        plan.require()
        dev = self.ctx.torch_device
        idx = self.ctx.index
        allocated_before = torch.cuda.memory_allocated(idx) if not self.ctx.dev_mode else 0
        arena: torch.Tensor | None = None
        weights: ModelWeights | None = None
        kv: KVCache | None = None
        gen: Generator | None = None
        fp: ops.Fingerprint | None = None
        try:
            with device_errors("loading the model", idx), torch.no_grad():
                self.ctx.bind_thread()
                lay = weight_layout(cfg, g, dtype)
                arena = torch.empty(lay.total_bytes, dtype=torch.uint8, device=dev)
                with open_model(model.source) as fh:
                    stats = upload(fh, g, lay, arena, model.digest, self.ctx)
                weights = bind(arena, lay, cfg)
                kv = KVCache.allocate(cfg, plan.max_seq_len, dtype, dev)
                gen = Generator(Model(cfg, weights, kv), kv, dev, self.prefill_chunk)
                gen.warmup()
                if capture_graph:
                    gen.capture()
                    gen.capture_prefill()
                fp = ops.Fingerprint([arena])
                fingerprint = fp.hex()
                self.ctx.synchronize()
        except BaseException:
            arena = kv = gen = weights = fp = None  # drop every device buffer of the failed load now
            self._release_cached()
            raise
        assert arena is not None and weights is not None and kv is not None and gen is not None and fp is not None
        vram = 0 if self.ctx.dev_mode else torch.cuda.memory_allocated(idx) - allocated_before
        handle = ModelShardHandle(
            shard_id=shard_id,
            gpu_device=idx,
            vram_bytes=vram,
            digest=model.digest,
            model_ref=model.source.ref if model_ref is None else model_ref,
            shard_index=shard_index,
            total_shards=total_shards,
        )
        rm = ResidentModel(self, cfg, weights, kv, gen, fp, handle, sealer, stats, vram)
        try:
            rm.handle = sealer.seal(handle, fingerprint)
            rm.attest()  # refuse to hand out a model that is not where it must be
        except BaseException:
            rm.close()
            raise
        self._models.append(rm)
        log.info(
            "model %s %s: %d bytes in %.2f s (%.2f GB/s), %s, S_max=%d, graph=%s",
            model.source.ref,
            "loaded in host memory (CPU development mode, not VRAM)" if self.ctx.dev_mode else "resident in VRAM",
            stats.resident_bytes,
            stats.seconds,
            stats.gb_per_s,
            plan.dtype,
            kv.max_seq_len,
            gen.graph is not None,
        )
        return rm

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
