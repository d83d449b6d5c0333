"""SPEC 4610-4613: the ECP is TRUE: everything it advertises loads and runs in this engine.

The ECP is derived from the engine's registries (``engine/profile.py``); these
tests take it as given and try every advertised (architecture x tensor type),
every attention layout and the max context on a tiny synthetic model in CPU
development mode, through the loader (capability match included) and
``ResidentModel.generate``. A value that cannot run fails here, so it cannot
stay advertised. Numbers, not just "it ran": a model whose matrices are all
type T must decode the same greedy tokens as its twin holding ggml's own
dequantization (gguf-py) of the same bytes in F32.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest

from worker_orcd.capability import ECP
from worker_orcd.engine.api import Engine, GenerationEnd, ResidentModel, SamplingParams, TokenEvent
from worker_orcd.engine.profile import build_ecp
from worker_orcd.errors import CapabilityError, ModelLoadError
from worker_orcd.gguf import GGMLType, parse_file
from worker_orcd.gguf.writer import GGUFWriter
from worker_orcd.loader import LoadOptions, ValidatedModel, validate_model
from worker_orcd.residency import load_resident, load_sealed
from worker_orcd.seal import Sealer
from synthetic import synth as _synth

synth = _synth()
THE_ECP: ECP = build_ecp("ecp-truth", 0)

# One tiny shape per architecture, every matrix row a whole number of 256-element (K-quant) blocks;
# an untied lm head makes the next token depend on the context (a tied tiny model echoes its last
# token) and a spread final norm makes greedy top-1 decisive (no near-ties to flip).
_DECISIVE = {"output_norm_gain": 4.0, "tied": False}
UNIT_SHAPES = {
    "llama": dataclasses.replace(synth.SHAPES["tiny-llama"], **_DECISIVE),
    "qwen2": dataclasses.replace(synth.SHAPES["tiny-qwen2"], **_DECISIVE),
    "gemma3": dataclasses.replace(synth.SHAPES["tiny-gemma3"], head_dim=128, **_DECISIVE),
}
PROMPT = [3, 17, 99, 250, 4, 8]
PROMPTS = (PROMPT, [500, 1, 77], [42] * 5 + [300])  # several contexts: several distinct argmaxes
STEPS = 4


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.open("cpu")


def _validated(path: Path) -> ValidatedModel:
    return validate_model(str(path), LoadOptions(model_root=path.parent), ecp=THE_ECP)


def _run(rm: ResidentModel, prompt: list[int], steps: int) -> list[int]:
    events = list(rm.generate(prompt, SamplingParams(max_tokens=steps)))
    end = events[-1]
    assert isinstance(end, GenerationEnd) and end.stop_reason == "max_tokens", end
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def _greedy(engine: Engine, vm: ValidatedModel, prompt: list[int], steps: int) -> tuple[list[int], ResidentModel]:
    """Load (plan, upload, seal) and decode; the caller closes the model."""
    rm: ResidentModel = load_sealed(engine, vm, shard_id="ecp-truth", sealer=Sealer(), kv_cache_mb=1).resident  # type: ignore[assignment]
    return _run(rm, prompt, steps), rm


def _greedy_all(engine: Engine, path: Path) -> tuple[list[list[int]], ValidatedModel, ResidentModel]:
    vm = _validated(path)
    rm: ResidentModel = load_sealed(engine, vm, shard_id="ecp-truth", sealer=Sealer(), kv_cache_mb=1).resident  # type: ignore[assignment]
    return [_run(rm, p, STEPS) for p in PROMPTS], vm, rm


def _dequantized_twin(src: Path, dst: Path) -> Path:
    """The same model with every tensor replaced by gguf-py's F32 dequantization of its bytes."""
    g = parse_file(src)
    w = GGUFWriter(alignment=g.alignment)
    for key, value in g.metadata.items():
        if key != "general.alignment":
            w.add(key, value, g.value_types[key], g.array_types.get(key))
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    for t in g.tensors:
        blob = np.asarray(raw[t.data_offset : t.data_offset + t.n_bytes])
        values = gguf.quants.dequantize(blob, gguf.GGMLQuantizationType[t.type_name])
        w.add_tensor(t.name, t.shape, GGMLType.F32, np.ascontiguousarray(values, dtype="<f4").tobytes())
    return w.write(dst)


def test_worker_4611_every_advertised_architecture_has_a_unit_model() -> None:
    """A new architecture in the engine's registry needs a unit shape here before it is advertised."""
    assert set(THE_ECP.supports_architecture) == set(UNIT_SHAPES)


@pytest.mark.parametrize("quant", THE_ECP.supports_quant)
@pytest.mark.parametrize("arch", THE_ECP.supports_architecture)
def test_worker_4610_every_advertised_architecture_and_type_runs(
    engine: Engine, tmp_path: Path, arch: str, quant: str
) -> None:
    path = synth.write_synthetic_model(tmp_path / f"{arch}-{quant}.gguf", UNIT_SHAPES[arch], quant)
    matrix_types = {t.type_name for t in parse_file(path).tensors if len(t.shape) == 2}
    assert matrix_types == {quant}  # the model really is that type, no fallback
    streams, vm, rm = _greedy_all(engine, path)  # validation: MCD within the ECP, else CapabilityError
    rm.close()
    assert vm.mcd.architecture == arch and quant in vm.mcd.quant
    # the engine rotates the way the MCD (llama.cpp's table) says this architecture needs
    assert rm.config.rope_neox == (vm.mcd.positional == "rope_neox")
    assert vm.mcd.positional in THE_ECP.supports_positional
    twin_streams, _, twin = _greedy_all(engine, _dequantized_twin(path, tmp_path / "twin.gguf"))
    twin.close()
    assert streams == twin_streams, f"{arch} {quant}: {streams}, the F32 dequantized twin: {twin_streams}"


@pytest.mark.parametrize("kind", THE_ECP.supports_attention)
def test_worker_4610_every_advertised_attention_layout_runs(engine: Engine, tmp_path: Path, kind: str) -> None:
    """KV-cache decode equals a fresh prefill of the whole sequence at every step, for each layout."""
    n_kv = {"mha": 4, "gqa": 2, "mqa": 1}[kind]  # KeyError: an advertised layout this test cannot build
    shape = dataclasses.replace(UNIT_SHAPES["llama"], n_heads=4, n_kv_heads=n_kv)
    vm = _validated(synth.write_synthetic_model(tmp_path / f"{kind}.gguf", shape, "F16"))
    assert vm.mcd.attention == kind
    toks, rm = _greedy(engine, vm, PROMPT, STEPS)
    try:
        assert rm.config.attention_kind == kind
        for i, t in enumerate(toks):
            events = list(rm.generate(PROMPT + toks[:i], SamplingParams(max_tokens=1)))
            assert isinstance(events[0], TokenEvent) and events[0].token_id == t, f"{kind}: step {i}"
    finally:
        rm.close()


def test_worker_4613_max_context_is_what_the_engine_accepts(engine: Engine, tmp_path: Path) -> None:
    """A model trained for exactly max_context loads and runs; one token more is refused by the
    capability match and, independently, by the engine itself."""
    at_max = dataclasses.replace(UNIT_SHAPES["llama"], context=THE_ECP.max_context)
    toks, rm = _greedy(engine, _validated(synth.write_synthetic_model(tmp_path / "max.gguf", at_max, "F16")), PROMPT, 1)
    rm.close()
    assert len(toks) == 1
    over = synth.write_synthetic_model(
        tmp_path / "over.gguf", dataclasses.replace(at_max, context=THE_ECP.max_context + 1), "F16"
    )
    with pytest.raises(CapabilityError) as e:
        _validated(over)
    assert "context" in e.value.message
    unmatched = validate_model(str(over), LoadOptions(model_root=tmp_path))  # no ECP: the engine must refuse
    with pytest.raises(ModelLoadError, match="max_context"):
        load_resident(engine, unmatched, kv_cache_mb=1)
