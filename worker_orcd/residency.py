"""The host's half of loading a model: one verified file in, a sealed handle out (SPEC 4110-4122).

The engine streams the open file onto the device (re-hashing it against the
verified digest) and computes a fingerprint of what is resident; it never sees
a handle or the seal key. Here the host builds the ``ModelShardHandle``, seals
it over that fingerprint, checks residency, and later re-verifies the seal
against a freshly computed fingerprint. A model refused at any of these steps
is closed before the error leaves, so no device buffer outlives a failed load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .engine.interface import EngineLike, ResidentModelLike
from .errors import InvalidParams
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

    def verify_seal_start(self) -> Callable[[], None]:
        """``verify_seal`` in two halves: the fingerprint is queued on the device now, the returned
        callable waits for it and checks the HMAC (raises as ``verify_seal``). The engine loop uses
        it so a seal check does not drain the device queue (loop.py)."""
        fingerprint = self.resident.fingerprint_start()
        return lambda: self._sealer.verify(self.handle, fingerprint())

    def close(self) -> None:
        self.resident.close()


def load_resident(engine: EngineLike, model: ValidatedModel, *, name: str | None = None, **engine_kw: Any) -> ResidentModelLike:
    """Stream the validated file, through a fresh descriptor, onto the engine's device (nothing sealed).

    The engine re-hashes every byte it reads against ``model.digest``, so a file changed since it
    was validated is refused (SPEC 4113)."""
    with open_model(model.source) as fh:
        return engine.load(model.gguf, fh, digest=model.digest, name=name or model.source.ref, **engine_kw)


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
    resident = load_resident(engine, model, name=ref, **engine_kw)
    try:
        handle = ModelShardHandle(
            shard_id=shard_id,
            gpu_device=resident.gpu_device,
            vram_bytes=resident.vram_bytes(),
            digest=model.digest,
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
