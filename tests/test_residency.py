"""The host's half of loading (SPEC 4110-4122): seal over the engine's fingerprint, refuse and close.

Runs on the fake engine (no torch): what is checked here is the host's policy; the real engine's
fingerprint is covered by test_engine_cpu.py / test_engine_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_http_fakes import FINGERPRINT, FakeEngine, FakeResident, Knobs, write_tiny_model

from worker_orcd.errors import ErrorCode, InvalidParams, SealVerificationError, WorkerError
from worker_orcd.loader import LoadOptions, ValidatedModel, validate_model
from worker_orcd.residency import load_sealed
from worker_orcd.seal import Sealer


@pytest.fixture
def validated(tmp_path: Path) -> ValidatedModel:
    path = write_tiny_model(tmp_path / "tiny.gguf")
    return validate_model(str(path), LoadOptions(model_root=tmp_path))


def test_worker_4120_seal_covers_the_engine_fingerprint(validated: ValidatedModel) -> None:
    engine = FakeEngine(Knobs())
    sealed = load_sealed(engine, validated, sealer=Sealer(), shard_id="s0", model_ref="tiny", shard_index=0)
    (resident,) = engine.models
    h = sealed.handle
    assert sealed.resident is resident and h.sealed and h.fingerprint == FINGERPRINT
    assert (h.shard_id, h.model_ref, h.digest, h.vram_bytes) == ("s0", "tiny", validated.digest, resident.vram_bytes())
    assert sealed.verify_seal() >= 0
    resident.resident_fingerprint = "0" * 64  # the resident bytes changed
    with pytest.raises(SealVerificationError) as e:
        sealed.verify_seal()
    assert e.value.code is ErrorCode.SEAL_VERIFICATION_FAILED
    sealed.close()
    assert resident.closed


def test_worker_4100_model_refused_at_attestation_is_closed(
    validated: ValidatedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine(Knobs())

    def not_resident(self: FakeResident) -> dict[str, object]:
        raise WorkerError("weights in host memory", code=ErrorCode.CUDA_ERROR)

    monkeypatch.setattr(FakeResident, "attest", not_resident)
    with pytest.raises(WorkerError) as e:
        load_sealed(engine, validated, sealer=Sealer(), shard_id="s0")
    assert e.value.code is ErrorCode.CUDA_ERROR
    (resident,) = engine.models
    assert resident.closed  # no device buffer outlives the refused load


def test_worker_4113_model_refused_at_sealing_is_closed(validated: ValidatedModel) -> None:
    class Refusing(Sealer):
        def seal(self, handle: object, fingerprint: str) -> object:  # type: ignore[override]
            raise SealVerificationError("refusing to seal")

    engine = FakeEngine(Knobs())
    with pytest.raises(SealVerificationError):
        load_sealed(engine, validated, sealer=Refusing(), shard_id="s0")
    (resident,) = engine.models
    assert resident.closed


def test_empty_shard_id_refused_before_loading(validated: ValidatedModel) -> None:
    engine = FakeEngine(Knobs())
    with pytest.raises(InvalidParams):
        load_sealed(engine, validated, sealer=Sealer(), shard_id="")
    assert engine.models == []
