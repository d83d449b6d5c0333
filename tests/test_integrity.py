"""Streamed SHA-256, expected digests and Ed25519 detached signatures (SPEC 4313-4314, 4320-4323, 4330-4333)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from worker_orcd.errors import ErrorCode, InvalidParams, ModelLoadError
from worker_orcd.integrity import (
    SIGNATURE_CONTEXT,
    check_expected_digest,
    generate_keypair,
    load_private_key,
    load_public_key,
    public_key_fingerprint,
    sha256_path,
    sha256_stream,
    sign_digest,
    sign_model,
    signature_path_for,
    verify_signature,
)
from ci_gate import need

# --- digest --------------------------------------------------------------------------------------


class RecordingReader(io.RawIOBase):
    """A file wrapper that refuses unbounded reads and records every readinto size."""

    def __init__(self, fh: io.BufferedReader) -> None:
        self._fh = fh
        self.sizes: list[int] = []

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        self.sizes.append(len(buf))
        return self._fh.readinto(buf)

    def read(self, size: int = -1) -> bytes:
        raise AssertionError("sha256_stream must stream with readinto, never read()")


@pytest.mark.slow
def test_worker_4320_sha256_of_real_model_equals_hashlib_with_bounded_memory(qwen05_path: Path) -> None:
    chunk = 1 << 20
    with open(qwen05_path, "rb") as raw:
        reader = RecordingReader(raw)
        tracemalloc.start()
        try:
            got = sha256_stream(reader, chunk_size=chunk)  # type: ignore[arg-type]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    with open(qwen05_path, "rb") as fh:
        want = hashlib.file_digest(fh, "sha256").hexdigest()
    assert got == want
    assert max(reader.sizes) == chunk  # one reused buffer, never the whole file
    assert len(reader.sizes) >= qwen05_path.stat().st_size // chunk
    assert peak < 3 * chunk, f"peak traced memory {peak} bytes for a {chunk}-byte chunk"


@pytest.mark.parametrize("size", [0, 1, 6, 7, 8, 100])
def test_worker_4320_sha256_stream_chunk_boundaries(size: int) -> None:
    data = os.urandom(size)
    assert sha256_stream(io.BytesIO(data), chunk_size=7) == hashlib.sha256(data).hexdigest()


def test_worker_4320_sha256_path(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(3 * 1024 + 5)
    path.write_bytes(data)
    assert sha256_path(path) == hashlib.sha256(data).hexdigest()


def test_worker_sha256_stream_rejects_bad_chunk_and_nonblocking_stall() -> None:
    with pytest.raises(ValueError):
        sha256_stream(io.BytesIO(b"x"), chunk_size=0)

    class Stalled(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buf: memoryview) -> None:  # type: ignore[override]
            return None  # what a non-blocking stream returns when nothing is ready

    with pytest.raises(ModelLoadError, match="without reaching end-of-file"):
        sha256_stream(Stalled())  # type: ignore[arg-type]


DIGEST_A = hashlib.sha256(b"a").hexdigest()
DIGEST_B = hashlib.sha256(b"b").hexdigest()


@pytest.mark.parametrize("expected", [None, DIGEST_A, DIGEST_A.upper(), f"sha256:{DIGEST_A}", f" {DIGEST_A}\n"])
def test_worker_4321_expected_digest_accepted(expected: str | None) -> None:
    check_expected_digest(DIGEST_A, expected)


def test_worker_4322_digest_mismatch_refuses_load() -> None:
    with pytest.raises(ModelLoadError) as info:
        check_expected_digest(DIGEST_A, DIGEST_B)
    assert info.value.code is ErrorCode.MODEL_LOAD_FAILED
    assert info.value.message == f"SHA-256 mismatch: expected {DIGEST_B}, file has {DIGEST_A}"


@pytest.mark.parametrize("bad", ["", DIGEST_A[:-1], DIGEST_A + "0", "g" * 64, "md5:" + DIGEST_A, 12])
def test_worker_4323_malformed_expected_digest_names_the_field(bad: object) -> None:
    with pytest.raises(InvalidParams, match="expected_digest") as info:
        check_expected_digest(DIGEST_A, bad)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.INVALID_PARAMS


# --- signatures ----------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub = tmp_path / "key.pem", tmp_path / "key.pub"
    generate_keypair(priv, pub)
    return priv, pub


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + os.urandom(4096))
    return path


def test_worker_4330_generate_keypair_writes_pem_with_private_mode_0600(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert load_private_key(priv).public_key() == load_public_key(pub)
    with pytest.raises(InvalidParams, match="already exists"):
        generate_keypair(priv, pub.with_name("other.pub"))
    assert not pub.with_name("other.pub").exists()


def test_worker_4331_sign_and_verify_roundtrip(keys: tuple[Path, Path], model: Path) -> None:
    priv, pub = keys
    sig_path = sign_model(model, priv)
    assert sig_path == model.with_name("model.gguf.sig") == signature_path_for(model)
    assert len(sig_path.read_bytes()) == 64
    assert sorted(p.name for p in model.parent.iterdir()) == ["key.pem", "key.pub", "model.gguf", "model.gguf.sig"]
    verify_signature(sha256_path(model), sig_path, load_public_key(pub))


def test_worker_4331_signature_is_over_context_plus_raw_digest(keys: tuple[Path, Path], model: Path) -> None:
    """The documented format, checked with the cryptography library directly."""
    priv, pub = keys
    sig = sign_model(model, priv).read_bytes()
    digest = hashlib.sha256(model.read_bytes()).digest()
    assert SIGNATURE_CONTEXT == b"worker-orcd-model-sig-v1\n"
    load_public_key(pub).verify(sig, SIGNATURE_CONTEXT + digest)  # raises if the format differs


def test_worker_4331_openssl_recipe_in_docstring_interoperates(tmp_path: Path, model: Path) -> None:
    """An operator without worker-orcd can sign with openssl as the module docstring says."""
    need(shutil.which("openssl") is not None, "openssl CLI not installed (apt install openssl)")
    key, pub, msg = tmp_path / "o.pem", tmp_path / "o.pub", tmp_path / "msg"
    sig = signature_path_for(model)
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary", model], check=True, capture_output=True).stdout
    msg.write_bytes(SIGNATURE_CONTEXT + digest)
    subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", key, "-in", msg, "-out", sig],
                   check=True, capture_output=True)
    verify_signature(sha256_path(model), sig, load_public_key(pub))


def _refused_sig(digest: str, sig_path: Path, pub: Ed25519PublicKey) -> str:
    with pytest.raises(ModelLoadError) as info:
        verify_signature(digest, sig_path, pub)
    assert info.value.code is ErrorCode.MODEL_LOAD_FAILED
    return info.value.message


def test_worker_4332_flipped_byte_in_signature_refused(keys: tuple[Path, Path], model: Path) -> None:
    priv, pub = keys
    sig_path = sign_model(model, priv)
    for index in (0, 31, 63):
        sig = bytearray(sig_path.read_bytes())
        sig[index] ^= 0x01
        sig_path.write_bytes(bytes(sig))
        key = load_public_key(pub)
        message = _refused_sig(sha256_path(model), sig_path, key)
        assert f"Ed25519 signature does not verify with public key {public_key_fingerprint(key)}" in message
        sig[index] ^= 0x01
        sig_path.write_bytes(bytes(sig))
    verify_signature(sha256_path(model), sig_path, load_public_key(pub))


def test_worker_4332_signature_by_another_key_refused(keys: tuple[Path, Path], model: Path) -> None:
    _, pub = keys
    other = Ed25519PrivateKey.generate()
    digest = sha256_path(model)
    sig_path = signature_path_for(model)
    sig_path.write_bytes(sign_digest(digest, other))
    verify_signature(digest, sig_path, other.public_key())  # valid for its own key...
    assert "does not verify" in _refused_sig(digest, sig_path, load_public_key(pub))  # ...not for ours


def test_worker_4332_signature_over_another_digest_refused(keys: tuple[Path, Path], model: Path) -> None:
    priv, pub = keys
    sig_path = sign_model(model, priv)
    model.write_bytes(model.read_bytes() + b"\0")  # the file changed after signing
    assert "does not verify" in _refused_sig(sha256_path(model), sig_path, load_public_key(pub))


def test_worker_4333_missing_signature_refused_when_key_configured(keys: tuple[Path, Path], model: Path) -> None:
    _, pub = keys
    message = _refused_sig(sha256_path(model), signature_path_for(model), load_public_key(pub))
    assert message.startswith("signature required (public key ed25519:")
    assert message.endswith("but the model's .sig file is missing") and str(model) not in message


@pytest.mark.parametrize("size", [0, 63, 65, 128])
def test_worker_4333_signature_of_wrong_length_refused(keys: tuple[Path, Path], model: Path, size: int) -> None:
    _, pub = keys
    sig_path = signature_path_for(model)
    sig_path.write_bytes(b"\x01" * size)
    assert "exactly 64 raw bytes" in _refused_sig(sha256_path(model), sig_path, load_public_key(pub))


def test_worker_verify_rejects_malformed_digest(keys: tuple[Path, Path], model: Path) -> None:
    priv, pub = keys
    sig_path = sign_model(model, priv)
    with pytest.raises(InvalidParams, match="digest"):
        verify_signature("nothex", sig_path, load_public_key(pub))


# --- key files -----------------------------------------------------------------------------------


def test_worker_public_key_pem_der_and_raw_forms(tmp_path: Path, model: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    forms = {
        "pem": pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "der": pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "raw": pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    }
    digest = sha256_path(model)
    sig_path = signature_path_for(model)
    sig_path.write_bytes(sign_digest(digest, key))
    for name, data in forms.items():
        path = tmp_path / f"pub.{name}"
        path.write_bytes(data)
        loaded = load_public_key(path)
        assert public_key_fingerprint(loaded) == public_key_fingerprint(pub)
        verify_signature(digest, sig_path, loaded)


def test_worker_private_key_raw_seed_signs_like_pem(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    seed = tmp_path / "seed"
    seed.write_bytes(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption()))
    assert sign_digest(DIGEST_A, load_private_key(seed)) == sign_digest(DIGEST_A, key)  # Ed25519 is deterministic


def _pem_public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: _pem_public(ed448.Ed448PrivateKey.generate().public_key()), "Ed448PublicKey, not an Ed25519 key"),
        (lambda: _pem_public(rsa.generate_private_key(65537, 1024).public_key()), "RSAPublicKey, not an Ed25519 key"),
        (lambda: Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
         "holds a private key"),
        (lambda: b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n", "not a PEM/DER public key"),
        (lambda: b"\x30" * 33, "not a PEM/DER public key"),
        (lambda: b"", "is empty"),
        (lambda: b"x" * (65 * 1024), "larger than"),
    ],
)
def test_worker_4330_bad_public_key_files_have_clear_errors(tmp_path: Path, make, needle: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.pub"
    path.write_bytes(make())
    with pytest.raises(ModelLoadError, match="public key file") as info:
        load_public_key(path)
    assert needle in info.value.message and str(path) in info.value.message


def test_worker_4330_missing_or_directory_public_key(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_public_key(tmp_path)


def test_worker_bad_private_key_files(tmp_path: Path) -> None:
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(ModelLoadError, match="encrypted"):
        load_private_key(encrypted)
    other = tmp_path / "rsa.pem"
    other.write_bytes(rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ModelLoadError, match="RSAPrivateKey, not an Ed25519 key"):
        load_private_key(other)


def test_worker_signature_path_for() -> None:
    assert signature_path_for("/m/model.gguf") == Path("/m/model.gguf.sig")
    assert signature_path_for(Path("/dev/shm/seg")) == Path("/dev/shm/seg.sig")
