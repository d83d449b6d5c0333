"""The sealed ModelShardHandle (SPEC 4110-4122).

The seal is an HMAC-SHA256, keyed by a per-process secret that never leaves
the process, over the handle's identity fields AND a fingerprint of the
resident weight bytes computed on the GPU. Re-verifying therefore proves both
that the handle was not forged/altered and that VRAM still holds the bytes
that were sealed. The fingerprint itself comes from the engine (host code
never touches device memory).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import SealVerificationError

SEAL_KEY_BYTES = 32


@dataclass(frozen=True)
class ModelShardHandle:
    shard_id: str
    gpu_device: int
    vram_bytes: int
    digest: str  # SHA-256 hex of the model file, verified before sealing (4113)
    model_ref: str
    shard_index: int = 0
    total_shards: int = 1
    sealed: bool = False
    sealed_at: str = ""  # RFC 3339 UTC
    fingerprint: str = ""  # GPU checksum of the resident bytes at seal time
    seal: str = ""  # HMAC-SHA256 hex; never shown in public views

    def public(self) -> dict[str, Any]:
        """The SPEC 4110 fields for responses and logs: no seal tag, no pointers (4111)."""
        d = asdict(self)
        d.pop("seal")
        d.pop("fingerprint")
        return d


def _message(h: ModelShardHandle) -> bytes:
    fields = {
        "shard_id": h.shard_id,
        "digest": h.digest,
        "sealed_at": h.sealed_at,
        "fingerprint": h.fingerprint,
        "gpu_device": h.gpu_device,
        "vram_bytes": h.vram_bytes,
        "model_ref": h.model_ref,
        "shard_index": h.shard_index,
        "total_shards": h.total_shards,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


class Sealer:
    """Holds the process-local seal key; seals and verifies handles."""

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) < SEAL_KEY_BYTES:
            raise ValueError(f"seal key must be at least {SEAL_KEY_BYTES} bytes")
        self._key = key if key is not None else secrets.token_bytes(SEAL_KEY_BYTES)

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> Sealer:
        return cls(Path(path).read_bytes())

    def _tag(self, h: ModelShardHandle) -> str:
        return hmac.new(self._key, _message(h), hashlib.sha256).hexdigest()

    def seal(self, handle: ModelShardHandle, fingerprint: str) -> ModelShardHandle:
        if len(handle.digest) != 64:
            raise SealVerificationError("refusing to seal: the file digest was not verified (4113)")
        sealed_at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        h = replace(handle, sealed=True, sealed_at=sealed_at, fingerprint=fingerprint, seal="")
        return replace(h, seal=self._tag(h))

    def verify(self, handle: ModelShardHandle, current_fingerprint: str) -> None:
        """Raise unless the handle's HMAC holds and VRAM still has the sealed bytes."""
        if not handle.sealed or not handle.seal:
            raise SealVerificationError(f"shard {handle.shard_id} is not sealed")
        if not hmac.compare_digest(self._tag(handle), handle.seal):
            raise SealVerificationError(f"seal of shard {handle.shard_id} does not verify: the handle was altered")
        if not hmac.compare_digest(current_fingerprint, handle.fingerprint):
            raise SealVerificationError(
                f"resident weights of shard {handle.shard_id} changed since sealing "
                f"(fingerprint {current_fingerprint[:16]}… != sealed {handle.fingerprint[:16]}…)"
            )
