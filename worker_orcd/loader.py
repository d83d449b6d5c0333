"""Model validation before anything reaches the GPU (SPEC 4310-4343, 4600-4623).

The order is the security argument, so it is fixed here and tested:

1. resolve the reference and confine it to the model root (4340-4343);
2. open it once; every later step reads this one descriptor, never the path;
3. refuse a file over the size cap before reading a byte (4311);
4. SHA-256 of the whole file, BEFORE parsing (4314/4320), always logged;
5. compare with the expected digest when one is given (4321);
6. Ed25519 detached signature when a public key is configured (4313/4330);
7. only now parse the GGUF header, whose parser is the largest attack surface;
8. derive the MCD (+ sidecar) and match it against the ECP (4003, 4620).

Unverified bytes are never parsed, and nothing is loaded when any step fails.

The one-pass load (``validate_model(..., one_pass=True)``) applies when there
is nothing to verify the file against: no expected digest and no public key.
Then hashing before parsing proves nothing, and the second pass it costs
(seconds per GB) is dropped: steps 4-6 move to the upload, which hashes every
byte in order as it streams them (``ValidatedModel.pending`` is the check it
runs, before anything executes on the weights and before the seal, SPEC
4113), and checks that the header it hashed is the header parsed here. With an
expected digest or a key the order above holds (two passes).
The sidecar ``<model>.mcd.json`` is not covered by the digest or signature:
it can only fill MCD fields the header lacks and must agree with every field
the header states, so it cannot change what the signed bytes say.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from .capability import ECP, MCD, load_sidecar, mcd_fields, merge_sidecar, require_match, sidecar_path_for
from .errors import ModelLoadError
from .gguf.constants import Limits
from .gguf.reader import GGUFFile, parse_file
from .integrity import (
    check_expected_digest,
    load_public_key,
    normalize_digest,
    sha256_stream,
    signature_path_for,
    verify_signature,
)
from .sources import ModelSource, check_model_size, open_model, resolve_model_source

LogFn = Callable[[str, dict[str, Any]], None]
_log = logging.getLogger("worker_orcd.loader")


def _default_log(event: str, fields: dict[str, Any]) -> None:
    _log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))


@dataclass(frozen=True)
class LoadOptions:
    model_root: Path
    expected_sha256: str | None = None
    public_key_path: Path | None = None
    limits: Limits = field(default_factory=Limits)
    require_signature: bool = False  # refuse to start without a public key (signatures mandatory)


@dataclass(frozen=True)
class DigestCheck:
    """Step 4 of a one-pass load, on the digest the upload computed (before the seal): always logged.
    (One pass is taken only with no expected digest and no key, so there is nothing to compare.)"""

    ref: str
    path: str
    size: int
    emit: LogFn

    def __call__(self, digest: str) -> None:
        self.emit("model_digest", {"model_ref": self.ref, "path": self.path, "size": self.size, "sha256": digest,
                                   "hashed": "while uploading (one pass)"})


@dataclass(frozen=True)
class ValidatedModel:
    source: ModelSource
    digest: str | None  # lower-case hex SHA-256 of the whole file; None until a one-pass upload hashed it
    size: int
    gguf: GGUFFile
    mcd: MCD
    signature: Literal["verified", "unsigned"]
    pending: DigestCheck | None = None  # one-pass load: what the upload's digest must pass

    def __post_init__(self) -> None:
        if (self.digest is None) != (self.pending is not None):
            raise ValueError("a validated model has its digest or a pending digest check, exactly one")


def _identity(fh: BinaryIO) -> tuple[int, int, int, int]:
    st = os.fstat(fh.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def validate_model(
    ref: str,
    options: LoadOptions,
    ecp: ECP | None = None,
    log: LogFn | None = None,
    *,
    one_pass: bool = False,
) -> ValidatedModel:
    """Resolve -> open -> size cap -> hash -> expected digest -> signature -> parse -> MCD -> match.

    ``one_pass``: when no expected digest and no key are configured, skip the hash here (the upload
    hashes, ``ValidatedModel.pending`` checks; module docstring). Raises ModelLoadError
    (MODEL_LOAD_FAILED) or CapabilityError (CAPABILITY_MISMATCH).
    """
    emit = log or _default_log
    # Configuration is checked before the (possibly 100 GB) hash, not after it.
    expected = None if options.expected_sha256 is None else normalize_digest(options.expected_sha256, "expected_sha256")
    if options.require_signature and options.public_key_path is None:
        raise ModelLoadError("signatures are required but no model public key is configured (--model-public-key)")
    key = None if options.public_key_path is None else load_public_key(options.public_key_path)

    source = resolve_model_source(ref, options.model_root)
    with open_model(source) as fh:
        before = _identity(fh)
        size = before[2]
        check_model_size(size, options.limits.max_file_size)

        digest: str | None = None
        pending: DigestCheck | None = None
        signature: Literal["verified", "unsigned"] = "unsigned"
        if one_pass and expected is None and key is None:
            pending = DigestCheck(ref, str(source.path), size, emit)
        else:
            fh.seek(0)
            digest = sha256_stream(fh)
            emit("model_digest", {"model_ref": ref, "path": str(source.path), "size": size, "sha256": digest})
            check_expected_digest(digest, expected)
            if key is not None:
                verify_signature(digest, signature_path_for(source.path), key)
                signature = "verified"

        gguf = parse_file(fh, options.limits)
        if _identity(fh) != before or gguf.file_size != size:
            # Same descriptor, so only an in-place rewrite can do this: the parsed bytes
            # may not be the hashed ones.
            raise ModelLoadError(
                "the model file changed while it was being validated; refusing it", detail=str(source.path)
            )

    partial = mcd_fields(gguf, model_id=source.path.stem)
    sidecar = sidecar_path_for(source.path)
    mcd = merge_sidecar(partial, load_sidecar(sidecar)) if os.path.lexists(sidecar) else partial.complete()
    if ecp is not None:
        require_match(mcd, ecp)
    emit(
        "model_validated",
        {
            "model_ref": ref,
            "sha256": digest if digest is not None else "pending (hashed while uploading)",
            "signature": signature,
            "model_id": mcd.model_id,
            "architecture": mcd.architecture,
        },
    )
    return ValidatedModel(source=source, digest=digest, size=size, gguf=gguf, mcd=mcd, signature=signature,
                          pending=pending)
