"""The pre-GPU load pipeline: order of checks, and that every failure refuses (SPEC 4310-4343, 4620)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from worker_orcd.capability import sidecar_path_for
from worker_orcd.engine.profile import EngineProfile, build_ecp
from worker_orcd.errors import CapabilityError, ErrorCode, InvalidParams, ModelLoadError
from worker_orcd.gguf import GGMLType, GGUFFormatError, Limits
from worker_orcd.gguf.writer import GGUFWriter, tensor_nbytes
from worker_orcd.integrity import generate_keypair, sign_model, signature_path_for
from worker_orcd.loader import LoadOptions, validate_model

QWEN05_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"  # pinned in models_catalog.json


def write_model(path: Path, *, drop: tuple[str, ...] = (), gtype: GGMLType = GGMLType.Q8_0) -> Path:
    """A tiny llama GGUF (gqa, 512 context) with patterned tensor bytes."""
    w = GGUFWriter()
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": 1,
        "llama.context_length": 512,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "tokenizer.ggml.tokens": ["a", "b"],
    }
    for key, value in meta.items():
        if key not in drop:
            w.add(key, value)
    n = tensor_nbytes((256, 2), gtype)
    w.add_tensor("token_embd.weight", (256, 2), gtype, (bytes(range(256)) * (n // 256 + 1))[:n])
    return w.write(path)


def corrupt(path: Path) -> Path:
    """Same file, cut short: its header now points past the end of the file."""
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Recorder:
    """The ``log`` callback: remembers every event in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.events.append((event, fields))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "models"
    r.mkdir()
    return r


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub = tmp_path / "key.pem", tmp_path / "key.pub"
    generate_keypair(priv, pub)
    return priv, pub


# --- the happy path ---------------------------------------------------------------------------


def test_worker_4310_validates_synthetic_model(root: Path) -> None:
    path = write_model(root / "tiny.gguf")
    log = Recorder()
    vm = validate_model("tiny.gguf", LoadOptions(model_root=root), ecp=build_ecp("w", 0), log=log)
    assert vm.digest == sha256(path) and vm.size == path.stat().st_size
    assert vm.signature == "unsigned" and vm.source.path == path.resolve() and vm.source.kind == "file"
    assert (vm.mcd.architecture, vm.mcd.attention, vm.mcd.quant) == ("llama", "gqa", ("Q8_0",))
    assert vm.gguf.tensor("token_embd.weight").ggml_type is GGMLType.Q8_0
    assert log.names() == ["model_digest", "model_validated"]
    assert log.events[1][1] == {
        "model_ref": "tiny.gguf",
        "sha256": vm.digest,
        "signature": "unsigned",
        "model_id": "tiny",
        "architecture": "llama",
    }


def test_worker_4322_digest_always_logged(root: Path) -> None:
    path = write_model(root / "tiny.gguf")
    log = Recorder()
    validate_model(str(path), LoadOptions(model_root=root), log=log)
    event, fields = log.events[0]
    assert event == "model_digest"
    assert fields == {
        "model_ref": str(path),
        "path": str(path.resolve()),
        "size": path.stat().st_size,
        "sha256": sha256(path),
    }


@pytest.mark.slow
def test_worker_4320_real_model_digest_matches_pin(qwen05_path: Path) -> None:
    opts = LoadOptions(model_root=qwen05_path.parent, expected_sha256=QWEN05_SHA256.upper())
    vm = validate_model(qwen05_path.name, opts, ecp=build_ecp("w", 0))
    assert vm.digest == QWEN05_SHA256
    assert vm.mcd.architecture == "qwen2" and vm.mcd.attention == "gqa"


# --- ordering: hash before parse, signature before parse ---------------------------------------


def test_worker_4320_digest_mismatch_reported_before_gguf_corruption(root: Path) -> None:
    path = corrupt(write_model(root / "tiny.gguf"))
    with pytest.raises(GGUFFormatError):  # control: the file really is a broken GGUF
        validate_model("tiny.gguf", LoadOptions(model_root=root))
    log = Recorder()
    with pytest.raises(ModelLoadError) as err:
        validate_model("tiny.gguf", LoadOptions(model_root=root, expected_sha256="0" * 64), log=log)
    assert not isinstance(err.value, GGUFFormatError)
    assert err.value.message == f"SHA-256 mismatch: expected {'0' * 64}, file has {sha256(path)}"
    assert log.names() == ["model_digest"]  # hashed (and logged) even though it was refused


def test_worker_4330_missing_signature_reported_before_gguf_corruption(root: Path, keys: tuple[Path, Path]) -> None:
    corrupt(write_model(root / "tiny.gguf"))
    with pytest.raises(ModelLoadError, match=r"signature required .* the model's \.sig file is missing"):
        validate_model("tiny.gguf", LoadOptions(model_root=root, public_key_path=keys[1]))


def test_worker_4330_signed_model_verified(root: Path, keys: tuple[Path, Path]) -> None:
    path = write_model(root / "tiny.gguf")
    assert sign_model(path, keys[0]) == signature_path_for(path)
    vm = validate_model("tiny.gguf", LoadOptions(model_root=root, public_key_path=keys[1], require_signature=True))
    assert vm.signature == "verified"


def test_worker_4331_signature_of_other_bytes_refused(root: Path, keys: tuple[Path, Path]) -> None:
    path = write_model(root / "tiny.gguf")
    sign_model(path, keys[0])
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")  # one byte of tensor data changed after signing
    with pytest.raises(ModelLoadError, match="does not verify"):
        validate_model("tiny.gguf", LoadOptions(model_root=root, public_key_path=keys[1]))


def test_worker_4332_signature_from_another_key_refused(root: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    path = write_model(root / "tiny.gguf")
    other_priv, other_pub = tmp_path / "o.pem", tmp_path / "o.pub"
    generate_keypair(other_priv, other_pub)
    sign_model(path, other_priv)
    with pytest.raises(ModelLoadError, match="does not verify"):
        validate_model("tiny.gguf", LoadOptions(model_root=root, public_key_path=keys[1]))


def test_worker_4333_require_signature_without_key_is_refused_first(root: Path) -> None:
    log = Recorder()
    with pytest.raises(ModelLoadError, match="no model public key is configured"):
        validate_model("does-not-exist.gguf", LoadOptions(model_root=root, require_signature=True), log=log)
    assert log.events == []


# --- what is refused before hashing ------------------------------------------------------------


def test_worker_4321_malformed_expected_digest_refused_before_hashing(root: Path) -> None:
    write_model(root / "tiny.gguf")
    log = Recorder()
    with pytest.raises(InvalidParams, match="expected_sha256 must be a SHA-256 digest"):
        validate_model("tiny.gguf", LoadOptions(model_root=root, expected_sha256="abc"), log=log)
    assert log.events == []


def test_worker_4332_bad_public_key_refused_before_hashing(root: Path, tmp_path: Path) -> None:
    write_model(root / "tiny.gguf")
    (tmp_path / "bad.pub").write_text("not a key")
    log = Recorder()
    with pytest.raises(ModelLoadError, match=r"public key file .* is not a PEM/DER public key"):
        validate_model("tiny.gguf", LoadOptions(model_root=root, public_key_path=tmp_path / "bad.pub"), log=log)
    assert log.events == []


def test_worker_4311_size_cap_refused_before_hashing(root: Path) -> None:
    path = write_model(root / "tiny.gguf")
    log = Recorder()
    limits = Limits(max_file_size=path.stat().st_size - 1)
    with pytest.raises(ModelLoadError, match="over the MAX_MODEL_SIZE limit"):
        validate_model("tiny.gguf", LoadOptions(model_root=root, limits=limits), log=log)
    assert log.events == []


def test_worker_4341_outside_root_refused_before_opening(root: Path, tmp_path: Path) -> None:
    write_model(tmp_path / "outside.gguf")
    log = Recorder()
    with pytest.raises(ModelLoadError, match="outside the model root"):
        validate_model("../outside.gguf", LoadOptions(model_root=root), log=log)
    assert log.events == []


def test_worker_4342_symlink_out_of_root_refused(root: Path, tmp_path: Path) -> None:
    (root / "link.gguf").symlink_to(write_model(tmp_path / "outside.gguf"))
    with pytest.raises(ModelLoadError, match="outside the model root"):
        validate_model("link.gguf", LoadOptions(model_root=root))


def test_worker_4310_file_rewritten_during_validation_refused(root: Path) -> None:
    path = write_model(root / "tiny.gguf")

    def tamper(event: str, fields: dict[str, Any]) -> None:
        if event == "model_digest":  # after hashing, before parsing
            with open(path, "ab") as fh:
                fh.write(b"\0" * 64)

    with pytest.raises(ModelLoadError, match="changed while it was being validated"):
        validate_model("tiny.gguf", LoadOptions(model_root=root), log=tamper)


# --- MCD, sidecar and capability -------------------------------------------------------------


def test_worker_4620_capability_mismatch_raised(root: Path) -> None:
    write_model(root / "tiny.gguf", gtype=GGMLType.IQ2_XS)
    with pytest.raises(CapabilityError) as err:
        validate_model("tiny.gguf", LoadOptions(model_root=root), ecp=build_ecp("w", 0))
    assert err.value.code is ErrorCode.CAPABILITY_MISMATCH
    assert err.value.message.startswith('model "tiny" needs quant one of [IQ2_XS]; this engine supports [F32, ')
    # Without an ECP the model is validated but not matched.
    assert validate_model("tiny.gguf", LoadOptions(model_root=root)).mcd.quant == ("IQ2_XS",)


def test_worker_4620_engine_context_limit(root: Path) -> None:
    write_model(root / "tiny.gguf")
    small = EngineProfile(("llama",), ("rope_llama",), ("gqa",), ("Q8_0",), max_context=256)
    with pytest.raises(CapabilityError, match="needs context_max 512; this engine supports up to 256"):
        validate_model("tiny.gguf", LoadOptions(model_root=root), ecp=build_ecp("w", 0, small))


def test_worker_4600_sidecar_completes_missing_metadata(root: Path) -> None:
    path = write_model(root / "tiny.gguf", drop=("llama.context_length", "general.name"))
    with pytest.raises(ModelLoadError, match=r"lacks llama\.context_length \(needed for context_max\)"):
        validate_model("tiny.gguf", LoadOptions(model_root=root))
    sidecar_path_for(path).write_text(json.dumps({"context_max": 4096}))
    vm = validate_model("tiny.gguf", LoadOptions(model_root=root))
    assert vm.mcd.context_max == 4096
    assert vm.mcd.model_id == "tiny"  # no general.name: the file's stem


def test_worker_4600_disagreeing_sidecar_refuses_load(root: Path) -> None:
    path = write_model(root / "tiny.gguf")
    sidecar_path_for(path).write_text(json.dumps({"attention": "mha"}))
    with pytest.raises(ModelLoadError, match="attention: GGUF says 'gqa', sidecar says 'mha'"):
        validate_model("tiny.gguf", LoadOptions(model_root=root), ecp=build_ecp("w", 0))


def test_worker_4600_invalid_sidecar_refuses_load(root: Path) -> None:
    path = write_model(root / "tiny.gguf")
    sidecar_path_for(path).write_text('{"context_max": 512, "trust_me": true}')
    with pytest.raises(ModelLoadError, match="trust_me: Extra inputs are not permitted"):
        validate_model("tiny.gguf", LoadOptions(model_root=root))


# --- the one-pass load (nothing to verify against: the upload hashes) -----------------------------


def test_worker_4113_one_pass_skips_the_hash_only_without_digest_or_key(
    root: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_model(root / "tiny.gguf")
    log = Recorder()
    hashed: list[int] = []
    import worker_orcd.loader as loader

    real = loader.sha256_stream
    monkeypatch.setattr(loader, "sha256_stream", lambda fh: hashed.append(1) or real(fh))
    vm = validate_model("tiny.gguf", LoadOptions(model_root=root), log=log, one_pass=True)
    assert vm.digest is None and vm.pending is not None and not hashed
    assert log.names() == ["model_validated"] and log.events[0][1]["sha256"] == "pending (hashed while uploading)"
    vm.pending(sha256(path))  # what the upload hands over: logged as every digest is (SPEC 4322)
    assert log.events[-1] == ("model_digest", {"model_ref": "tiny.gguf", "path": str(path.resolve()),
                                               "size": path.stat().st_size, "sha256": sha256(path),
                                               "hashed": "while uploading (one pass)"})
    # with something to verify against, the bytes are verified before they are parsed (two passes)
    vm = validate_model("tiny.gguf", LoadOptions(model_root=root, expected_sha256=sha256(path)), one_pass=True)
    assert vm.digest == sha256(path) and vm.pending is None and len(hashed) == 1
    priv, pub = keys
    sign_model(path, priv)
    vm = validate_model("tiny.gguf", LoadOptions(model_root=root, public_key_path=pub), one_pass=True)
    assert vm.digest == sha256(path) and vm.signature == "verified" and len(hashed) == 2
    with pytest.raises(ModelLoadError, match="SHA-256 mismatch"):
        validate_model("tiny.gguf", LoadOptions(model_root=root, expected_sha256="0" * 64), one_pass=True)


def test_worker_4310_parsed_header_hash_is_of_the_parsed_bytes(root: Path) -> None:
    path = write_model(root / "tiny.gguf")
    vm = validate_model("tiny.gguf", LoadOptions(model_root=root))
    g = vm.gguf
    assert g.header_sha256 == hashlib.sha256(path.read_bytes()[: g.header_size]).hexdigest()
