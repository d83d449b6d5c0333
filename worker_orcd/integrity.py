"""Model integrity: streamed SHA-256 and Ed25519 detached signatures (SPEC 4313-4314, 4320-4323, 4330-4333).

Digest: SHA-256 of the whole model file, computed before the GGUF header is
parsed, streamed through one reused buffer (a 100 GB file never sits in RAM;
``hashlib`` drops the GIL while it hashes).

Signature format (``worker-orcd-model-sig-v1``):

* the signature of ``model.gguf`` is the file ``model.gguf.sig`` next to it;
* it holds exactly the 64 raw bytes of an Ed25519 signature (RFC 8032, pure
  Ed25519, no prehash flag), no header, no encoding;
* the signed message is ``SIGNATURE_CONTEXT + sha256(model file)``, i.e. the
  25 ASCII bytes ``b"worker-orcd-model-sig-v1\\n"`` followed by the 32 raw
  digest bytes. Signing the digest, not the file, lets the worker verify a
  100 GB model from the one hashing pass it needs anyway; the context string
  keeps these signatures from being valid for any other protocol.
* the public key is a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo, as written by
  ``openssl pkey -pubout``), its DER form, or the raw 32-byte key.

Reproduce with openssl::

    openssl genpkey -algorithm ed25519 -out key.pem
    openssl pkey -in key.pem -pubout -out key.pub
    { printf 'worker-orcd-model-sig-v1\\n'; openssl dgst -sha256 -binary model.gguf; } > msg
    openssl pkeyutl -sign -rawin -inkey key.pem -in msg -out model.gguf.sig
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import InvalidParams, ModelLoadError

SIGNATURE_CONTEXT = b"worker-orcd-model-sig-v1\n"
SIGNATURE_SUFFIX = ".sig"
SIGNATURE_BYTES = 64
RAW_KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM key is < 200 bytes; never slurp an arbitrary file
DEFAULT_CHUNK = 8 << 20
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


# --- digest -------------------------------------------------------------------------------


def sha256_stream(fh: BinaryIO, chunk_size: int = DEFAULT_CHUNK) -> str:
    """Hex SHA-256 of everything left in ``fh``; memory stays at one ``chunk_size`` buffer."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    digest = hashlib.sha256()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    while True:
        n = fh.readinto(view)
        if n is None:  # a non-blocking stream with nothing ready must not pass as end-of-file
            raise ModelLoadError("model stream returned no data without reaching end-of-file")
        if not n:
            break
        digest.update(view[:n])
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (unbuffered: readinto fills our buffer directly)."""
    with open(path, "rb", buffering=0) as fh:
        return sha256_stream(fh)


def normalize_digest(value: str, field: str = "expected_digest") -> str:
    """Lower-case 64-hex SHA-256; an optional ``sha256:`` prefix is accepted (OCI style)."""
    if not isinstance(value, str):
        raise InvalidParams(f"{field} must be a string of 64 hex characters, got {type(value).__name__}")
    text = value.strip()
    if text[:7].lower() == "sha256:":
        text = text[7:]
    if not _HEX64.fullmatch(text):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidParams(f"{field} must be a SHA-256 digest of 64 hex characters, got {shown!r}")
    return text.lower()


def check_expected_digest(actual: str, expected: str | None) -> None:
    """SPEC 4223/4321: refuse the model when an expected digest is given and differs."""
    if expected is None:
        return
    want = normalize_digest(expected, "expected_digest")
    have = normalize_digest(actual, "actual digest")
    if not hmac.compare_digest(want, have):
        raise ModelLoadError(f"SHA-256 mismatch: expected {want}, file has {have}")


# --- keys -----------------------------------------------------------------------------------


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ModelLoadError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{what} file {path} is a directory") from None
    except OSError as e:
        raise ModelLoadError(f"{what} file {path} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ModelLoadError(f"{what} file {path} is larger than {MAX_KEY_FILE_BYTES} bytes; not a key")
    if not data:
        raise ModelLoadError(f"{what} file {path} is empty")
    return data


def _not_ed25519(path: Path, what: str, key: object) -> ModelLoadError:
    kind = type(key).__name__.lstrip("_")
    return ModelLoadError(f"{what} file {path} holds a {kind}, not an Ed25519 key (model signatures are Ed25519)")


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Public key from PEM SubjectPublicKeyInfo, DER, or 32 raw bytes."""
    path = Path(path)
    data = _read_key_file(path, "public key")
    if len(data) == RAW_KEY_BYTES:
        return Ed25519PublicKey.from_public_bytes(data)
    if b"PRIVATE KEY-----" in data:
        raise ModelLoadError(
            f"public key file {path} holds a private key; give the worker only the public half "
            f"(openssl pkey -in KEY -pubout)"
        )
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ModelLoadError(
            f"public key file {path} is not a PEM/DER public key or a raw 32-byte Ed25519 key ({e})"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise _not_ed25519(path, "public key", key)
    return key


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Unencrypted PEM/DER PKCS#8 private key, or the raw 32-byte seed."""
    path = Path(path)
    data = _read_key_file(path, "private key")
    if len(data) == RAW_KEY_BYTES:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ModelLoadError(f"private key file {path} is encrypted; decrypt it first (openssl pkey -in KEY)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ModelLoadError(f"private key file {path} is not a PEM/DER private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise _not_ed25519(path, "private key", key)
    return key


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    """Short stable name for a key in messages and logs: SHA-256 of the raw key, 16 hex chars."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


# --- signatures ----------------------------------------------------------------------------


def signature_path_for(model_path: str | os.PathLike[str]) -> Path:
    """``model.gguf`` -> ``model.gguf.sig`` in the same directory."""
    path = Path(model_path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def signature_message(digest_hex: str) -> bytes:
    """The exact bytes that are signed: context string + raw 32-byte digest."""
    return SIGNATURE_CONTEXT + bytes.fromhex(normalize_digest(digest_hex, "digest"))


def sign_digest(digest_hex: str, private_key: Ed25519PrivateKey) -> bytes:
    return private_key.sign(signature_message(digest_hex))


def verify_signature(digest_hex: str, sig_path: str | os.PathLike[str], public_key: Ed25519PublicKey) -> None:
    """SPEC 4330-4333: a configured key makes the signature mandatory; any failure refuses the load."""
    sig_path = Path(sig_path)
    message = signature_message(digest_hex)
    fingerprint = public_key_fingerprint(public_key)
    try:
        with open(sig_path, "rb") as fh:
            sig = fh.read(SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        raise ModelLoadError(
            f"signature required (public key {fingerprint} is configured) but the model's .sig file is missing",
            detail=f"missing: {sig_path}",
        ) from None
    except OSError as e:
        raise ModelLoadError(
            "the model's .sig file cannot be read", detail=f"{sig_path}: {e.strerror or e}"
        ) from None
    if len(sig) != SIGNATURE_BYTES:
        size = f"{len(sig)} bytes" if len(sig) <= SIGNATURE_BYTES else f"more than {SIGNATURE_BYTES} bytes"
        raise ModelLoadError(
            f"the model's .sig file has {size}; an Ed25519 signature is exactly {SIGNATURE_BYTES} raw bytes",
            detail=str(sig_path),
        )
    try:
        public_key.verify(sig, message)
    except InvalidSignature:
        raise ModelLoadError(
            f"the model's Ed25519 signature does not verify with public key {fingerprint} "
            f"for sha256 {message[len(SIGNATURE_CONTEXT):].hex()}",
            detail=str(sig_path),
        ) from None


# --- operator tools (`worker-orcd sign`, `worker-orcd keygen`) ---------------------------------


def sign_model(model_path: str | os.PathLike[str], private_key_path: str | os.PathLike[str]) -> Path:
    """Hash the model, sign its digest, write ``<model>.sig`` atomically; returns the .sig path."""
    model_path = Path(model_path)
    key = load_private_key(private_key_path)
    try:
        digest = sha256_path(model_path)
    except OSError as e:
        raise ModelLoadError(f"model file {model_path} cannot be read: {e.strerror or e}") from None
    sig_path = signature_path_for(model_path)
    _write_atomic(sig_path, sign_digest(digest, key), mode=0o644)
    return sig_path


def generate_keypair(private_out: str | os.PathLike[str], public_out: str | os.PathLike[str]) -> str:
    """Write a new Ed25519 key pair as PEM (private 0600, PKCS#8); returns the key's fingerprint.

    Existing files are never overwritten: losing a signing key is worse than an error.
    """
    private_out, public_out = Path(private_out), Path(public_out)
    if private_out.resolve() == public_out.resolve():
        raise InvalidParams("private and public key outputs must be different files")
    for path in (private_out, public_out):
        if os.path.lexists(path):
            raise InvalidParams(f"{path} already exists; refusing to overwrite a key file")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_out, private_pem, mode=0o600)
    try:
        _write_new(public_out, public_pem, mode=0o644)
    except BaseException:
        private_out.unlink(missing_ok=True)
        raise
    return public_key_fingerprint(key.public_key())


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create exclusively with the final mode from the start (no window where a key is 0644)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except FileExistsError:
        raise InvalidParams(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as e:
        raise InvalidParams(f"cannot create {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed (or, for 0600, cannot widen) the mode
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Temp file in the same directory + rename: a reader sees the old .sig or the new one."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise InvalidParams(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
