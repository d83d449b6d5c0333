"""The host's half of loading a model: one verified file in, a sealed handle out (SPEC 4110-4122).

The engine streams the open file onto the device (hashing it: against the
verified digest, or for a one-pass load reporting it) and computes a fingerprint of what is resident; it never sees
a handle or the seal key. Here the host builds the ``ModelShardHandle``, seals
it over that fingerprint, checks residency, and later re-verifies the seal
against a freshly computed fingerprint. A model refused at any of these steps
is closed before the error leaves, so no device buffer outlives a failed load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .engine.interface import EngineLike, PendingFingerprintLike, ResidentModelLike
from .errors import InvalidParams, ModelLoadError
from .loader import ValidatedModel
from .seal import ModelShardHandle, Sealer
from .sources import open_model


class SealedModel:
    """A resident model and the host's seal over it; ``verify_seal`` is the check before execution."""

    def __init__(self, resident: ResidentModelLike, handle: ModelShardHandle, sealer: Sealer) -> None:
        self.resident = resident
        self.handle = handle
        self._sealer = sealer

    def verify_seal(self) -> float:
        """Recompute the fingerprint where the weights live and check the HMAC (SPEC 4121); returns ms.

        Raises ``SealVerificationError`` (SEAL_VERIFICATION_FAILED) on any mismatch; the caller
        decides what that means for the worker (fatal, 4122)."""
        t0 = time.perf_counter()
        self._sealer.verify(self.handle, self.resident.fingerprint())
        return (time.perf_counter() - t0) * 1e3

    def verify_seal_start(self, *, beside_steps: bool = False) -> PendingSealCheck:
        """``verify_seal`` in two halves: the fingerprint starts on the device now (beside the
        engine's next steps); calling the result waits for it and checks the HMAC (raises as
        ``verify_seal``), ``ready()`` asks whether it finished. The engine loop admits the jobs a
        check covers once it passes, without making any step wait for it (loop.py). ``beside_steps``:
        other jobs' steps run meanwhile, so the fingerprint takes a bounded share of the GPU."""
        return PendingSealCheck(self, self.resident.fingerprint_start(beside_steps=beside_steps))

    def close(self) -> None:
        self.resident.close()


class PendingSealCheck:
    """A seal check whose fingerprint runs on the device: ``ready()`` without waiting, ``()`` finishes it."""

    def __init__(self, sealed: SealedModel, fingerprint: PendingFingerprintLike) -> None:
        self._sealed = sealed
        self._fingerprint = fingerprint

    def ready(self) -> bool:
        return self._fingerprint.ready()

    def __call__(self) -> None:
        self._sealed._sealer.verify(self._sealed.handle, self._fingerprint())


def load_resident(engine: EngineLike, model: ValidatedModel, *, name: str | None = None, **engine_kw: Any) -> ResidentModelLike:
    """Stream the validated file, through a fresh descriptor, onto the engine's device (nothing sealed).

    The engine hashes every byte it reads: against ``model.digest``, so a file changed since it was
    validated is refused (SPEC 4113); or, in a one-pass load, handing the digest to
    ``model.pending`` (logged) before anything runs on the weights."""
    return _streamed(engine, model, name=name, **engine_kw)[0]


def _streamed(
    engine: EngineLike, model: ValidatedModel, *, name: str | None = None, **engine_kw: Any
) -> tuple[ResidentModelLike, str]:
    """``load_resident`` and the SHA-256 of the bytes streamed (what the handle and the seal carry)."""
    seen: list[str] = []

    def on_digest(digest: str) -> None:
        assert model.pending is not None
        model.pending(digest)
        seen.append(digest)

    with open_model(model.source) as fh:
        if model.digest is not None:
            return engine.load(model.gguf, fh, digest=model.digest, name=name or model.source.ref, **engine_kw), model.digest
        resident = engine.load(model.gguf, fh, on_digest=on_digest, name=name or model.source.ref, **engine_kw)
    if len(seen) != 1:
        resident.close()
        raise ModelLoadError("the engine loaded the model without reporting the digest of what it streamed")
    return resident, seen[0]


def load_sealed(
    engine: EngineLike,
    model: ValidatedModel,
    *,
    sealer: Sealer,
    shard_id: str,
    model_ref: str | None = None,
    shard_index: int = 0,
    total_shards: int = 1,
    **engine_kw: Any,
) -> SealedModel:
    """Load ``model``, seal its handle over the engine's fingerprint and check residency (SPEC 4100, 4120).

    ``engine_kw`` goes to ``engine.load`` (kv_cache_mb, max_batch, prefill_chunk, before_admit, ...).
    """
    if not shard_id:
        raise InvalidParams("shard_id must be non-empty")
    ref = model.source.ref if model_ref is None else model_ref
    resident, digest = _streamed(engine, model, name=ref, **engine_kw)
    try:
        handle = ModelShardHandle(
            shard_id=shard_id,
            gpu_device=resident.gpu_device,
            vram_bytes=resident.vram_bytes(),
            digest=digest,
            model_ref=ref,
            shard_index=shard_index,
            total_shards=total_shards,
        )
        sealed = SealedModel(resident, sealer.seal(handle, resident.fingerprint()), sealer)
        resident.attest()  # refuse to hand out a model that is not where it must be
    except BaseException:
        resident.close()
        raise
    return sealed
