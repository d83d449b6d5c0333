"""SPEC 4013: every buffer the engine allocates belongs to an object and dies with it.

A model is loaded on the CPU engine, used (prefill, decode, sampling, the fingerprint,
attestation) and closed; then no tensor created meanwhile may still be alive anywhere in
the process: not in the model's own buffers, and not in a module- or class-level cache
(RoPE tables, checksum plans, graph buffers...). Found by ``gc`` over every live tensor,
so a cache added later is caught without naming it here. On a GPU the same holds for
device memory (test_engine_gpu.py, test_worker_4013_close_releases_every_device_buffer).
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from worker_orcd.engine import ops
from worker_orcd.engine.api import Engine, ResidentModel, SamplingParams
from worker_orcd.loader import LoadOptions, ValidatedModel, validate_model
from worker_orcd.residency import load_sealed
from worker_orcd.seal import Sealer
from synthetic import synth as _synth

synth = _synth()


def _live_tensors() -> dict[int, weakref.ref[torch.Tensor]]:
    gc.collect()
    return {id(o): weakref.ref(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}


def _survivors(before: dict[int, weakref.ref[torch.Tensor]]) -> list[torch.Tensor]:
    """Tensors alive now that were not alive in ``before`` (an id reused by a new object counts as new)."""
    out = []
    for key, ref in _live_tensors().items():
        t = ref()
        old = before.get(key)
        if t is not None and (old is None or old() is not t):
            out.append(t)
    return out


def _holder(r: object) -> str:
    """A referrer by name where it is a module global (``pkg.mod.NAME``), else by type."""
    for mod in list(sys.modules.values()):
        for key, value in list(getattr(mod, "__dict__", {}).items()):
            if value is r:
                return f"{mod.__name__}.{key}"
    return type(r).__name__


def _describe(tensors: list[torch.Tensor]) -> str:
    lines = []
    shown = tensors[:10]
    for t in shown:
        holders = [_holder(r) for r in gc.get_referrers(t) if r is not tensors and r is not shown]
        lines.append(f"{tuple(t.shape)} {t.dtype} on {t.device}, held by {holders}")
    return "\n".join(lines)


def _model(tmp: Path, name: str, rope_theta: float) -> ValidatedModel:
    """A tiny qwen2 with its own RoPE base: a per-(theta, device) cache cannot have been filled before."""
    shape = dataclasses.replace(synth.SHAPES["tiny-qwen2"], rope_theta=rope_theta)
    path = synth.write_synthetic_model(tmp / f"{name}.gguf", shape, "Q8_0")
    return validate_model(str(path), LoadOptions(model_root=tmp))


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine.open("cpu")
    yield eng
    eng.close()


def _use(rm: ResidentModel) -> None:
    """Every path that allocates: prefill, decode, greedy and sampled rows, fingerprint, attestation."""
    for params in (SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, temperature=0.9, top_k=20, seed=3)):
        assert len(list(rm.generate([3, 17, 99, 250, 4], params))) == 5
    rm.runner.prefill_logits([5, 6, 7])
    rm.fingerprint()
    rm.attest()


def _cycle(engine: Engine, vm: ValidatedModel, during: Callable[[], object] = lambda: None) -> tuple[list[torch.Tensor], list[weakref.ref[torch.Tensor]]]:
    """Load, use, close; (tensors created meanwhile and still alive, weakrefs to the model's own buffers)."""
    before = _live_tensors()
    sealed = load_sealed(engine, vm, sealer=Sealer(), shard_id="lifetime", kv_cache_mb=1)
    rm: ResidentModel = sealed.resident  # type: ignore[assignment]
    sealed.verify_seal()
    during()
    _use(rm)
    owned = [weakref.ref(t) for t in (rm._weights.arena, rm._kv.k, rm._kv.v, *rm.runner.buffers())]
    sealed.close()
    del sealed, rm
    return _survivors(before), owned


def test_worker_4013_closed_model_leaves_no_tensor_behind(engine: Engine, tmp_path: Path) -> None:
    _cycle(engine, _model(tmp_path, "warm", 1e6))  # first use: torch's own lazy state is process-wide, not ours
    survivors, owned = _cycle(engine, _model(tmp_path, "measured", 123457.0))
    assert all(ref() is None for ref in owned), "the model's weights / KV cache / scratch outlived close()"
    assert not survivors, f"{len(survivors)} tensors created by the engine outlived the model:\n{_describe(survivors)}"
    assert engine._models == []


def test_worker_4013_closed_model_leaves_no_tensor_behind_on_the_kernel_path(engine: Engine, tmp_path: Path) -> None:
    """The same on the GPU code path (every Triton kernel, run by the interpreter on CPU tensors)."""
    from worker_orcd.engine.kernels import validate

    if not validate.TRITON_INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1")
    ops.use_kernels_on_cpu(True)
    try:
        _cycle(engine, _model(tmp_path, "warm-k", 1e6))
        survivors, owned = _cycle(engine, _model(tmp_path, "measured-k", 234567.0))
    finally:
        ops.use_kernels_on_cpu(False)
    assert all(ref() is None for ref in owned)
    assert not survivors, f"{len(survivors)} tensors created by the engine outlived the model:\n{_describe(survivors)}"
