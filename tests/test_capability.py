"""MCD derivation, sidecar merging and MCD-vs-ECP matching (SPEC 4003, 4600-4623)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from worker_orcd.capability import (
    ECP,
    MCD,
    POSITIONAL_BY_ARCH,
    derive_mcd,
    load_sidecar,
    match,
    mcd_fields,
    merge_sidecar,
    require_match,
    sidecar_path_for,
    validate_sidecar,
)
from worker_orcd.engine.profile import ENGINE_PROFILE, EngineProfile, build_ecp
from worker_orcd.errors import CapabilityError, ErrorCode, InvalidParams, ModelLoadError
from worker_orcd.gguf import GGMLType, GGUFFile, parse_file
from worker_orcd.gguf.writer import GGUFWriter, tensor_nbytes

F32_TENSOR = (("token_embd.weight", (32, 4), GGMLType.F32),)


def write_model(
    path: Path,
    arch: str = "llama",
    *,
    meta: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    tensors: tuple[tuple[str, tuple[int, ...], GGMLType], ...] = F32_TENSOR,
) -> Path:
    """A tiny real GGUF: valid header, zeroed tensor data."""
    base: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.block_count": 3,
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": 32,
        f"{arch}.attention.head_count": 8,
        f"{arch}.attention.head_count_kv": 8,
        "tokenizer.ggml.tokens": ["a", "b", "c", "d"],
    }
    base.update(meta or {})
    w = GGUFWriter()
    for key, value in base.items():
        if key not in drop:
            w.add(key, value)
    for name, shape, gtype in tensors:
        w.add_tensor(name, shape, gtype, bytes(tensor_nbytes(shape, gtype)))
    return w.write(path)


def gguf_of(tmp_path: Path, arch: str = "llama", **kw: Any) -> GGUFFile:
    return parse_file(write_model(tmp_path / "m.gguf", arch, **kw))


# --- derivation from the three real models ---------------------------------------------------


def test_worker_4600_mcd_qwen05_real(qwen05_path: Path) -> None:
    mcd = derive_mcd(parse_file(qwen05_path))
    assert mcd == MCD(
        model_id="Qwen2.5 Coder 0.5B Instruct AWQ",
        positional="rope_neox",
        attention="gqa",  # 14 query heads share 2 kv heads
        quant=("F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"),
        context_max=32768,
        vocab_size=151936,
        architecture="qwen2",
    )


def test_worker_4600_mcd_qwen15_real(qwen15_path: Path) -> None:
    mcd = derive_mcd(parse_file(qwen15_path))
    assert (mcd.positional, mcd.attention, mcd.quant) == ("rope_neox", "gqa", ("F32", "Q4_K", "Q6_K"))
    assert (mcd.context_max, mcd.vocab_size, mcd.architecture) == (32768, 151936, "qwen2")


def test_worker_4600_mcd_gemma3_real(gemma_path: Path) -> None:
    mcd = derive_mcd(parse_file(gemma_path))
    assert mcd.positional == "rope_neox"
    assert mcd.attention == "mqa"  # head_count 4, head_count_kv 1
    assert mcd.quant == ("F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0")
    assert (mcd.context_max, mcd.vocab_size, mcd.model_id) == (32768, 262144, "Gemma 3 270m")


@pytest.mark.parametrize("fixture", ["qwen05_path", "qwen15_path", "gemma_path"])
def test_worker_4620_real_models_within_engine_ecp(fixture: str, request: pytest.FixtureRequest) -> None:
    mcd = derive_mcd(parse_file(request.getfixturevalue(fixture)))
    result = require_match(mcd, build_ecp("w0", 24 << 30))
    assert result.accepted and result.rejections == ()


# --- derivation from synthetic GGUFs -----------------------------------------------------------


def test_worker_4600_llama_is_rope_llama_mha(tmp_path: Path) -> None:
    mcd = derive_mcd(gguf_of(tmp_path))
    assert mcd == MCD("tiny", "rope_llama", "mha", ("F32",), 256, 4, "llama")


@pytest.mark.parametrize(
    ("heads", "kv", "kind"),
    [
        (8, 8, "mha"),
        (8, 2, "gqa"),
        (8, 1, "mqa"),
        (1, 1, "mha"),  # a single head is not "multi-query"
        ([8, 8, 8], [8, 8, 8], "mha"),
        ([8, 8, 8], [2, 2, 2], "gqa"),
        ([8, 8, 8], [1, 1, 1], "mqa"),
        ([8, 8, 8], [8, 2, 8], "gqa"),  # layers of different kinds
        ([8, 8, 8], 2, "gqa"),  # scalar kv broadcast over per-layer heads
        ([0, 8, 8], [0, 8, 8], "mha"),  # layer 0 has no attention (hybrid model)
        ([0, 0, 0], [0, 0, 0], "none"),
    ],
)
def test_worker_4600_attention_kind(tmp_path: Path, heads: Any, kv: Any, kind: str) -> None:
    meta = {"llama.attention.head_count": heads, "llama.attention.head_count_kv": kv}
    assert derive_mcd(gguf_of(tmp_path, meta=meta)).attention == kind


def test_worker_4600_missing_head_count_kv_means_mha(tmp_path: Path) -> None:
    g = gguf_of(tmp_path, drop=("llama.attention.head_count_kv",))
    assert derive_mcd(g).attention == "mha"


@pytest.mark.parametrize(
    ("heads", "kv", "needle"),
    [
        (8, 3, "must divide"),
        (4, 8, "must divide"),
        ([8, 8], [8, 8], "2 per-layer entries but block_count is 3"),
        ([8, 8, 8], [8, 8], "per-layer entries"),
        (-1, 1, "non-negative integer"),
        (True, 1, "non-negative integer"),
    ],
)
def test_worker_4600_bad_head_counts(tmp_path: Path, heads: Any, kv: Any, needle: str) -> None:
    g = gguf_of(tmp_path, meta={"llama.attention.head_count": heads, "llama.attention.head_count_kv": kv})
    with pytest.raises(ModelLoadError, match=needle):
        derive_mcd(g)


@pytest.mark.parametrize(
    ("arch", "positional"),
    [
        ("llama", "rope_llama"),
        ("granite", "rope_llama"),
        ("command-r", "rope_llama"),
        ("deepseek2", "rope_llama"),
        ("qwen2", "rope_neox"),
        ("qwen2moe", "rope_neox"),
        ("qwen3", "rope_neox"),
        ("gemma", "rope_neox"),
        ("gemma2", "rope_neox"),
        ("gemma3", "rope_neox"),
        ("phi2", "rope_neox"),
        ("phi3", "rope_neox"),
        ("stablelm", "rope_neox"),
        ("gptneox", "rope_neox"),
        ("falcon", "rope_neox"),
        ("starcoder2", "rope_neox"),
        ("bloom", "alibi"),
        ("mpt", "alibi"),
        ("mamba", "none"),
        ("qwen2vl", "rope_mrope"),
        ("frobnicator", "unknown:frobnicator"),
    ],
)
def test_worker_4600_positional_by_architecture(tmp_path: Path, arch: str, positional: str) -> None:
    assert derive_mcd(gguf_of(tmp_path, arch)).positional == positional


def test_worker_4600_glm4_with_rope_sections_is_mrope(tmp_path: Path) -> None:
    assert derive_mcd(gguf_of(tmp_path, "glm4")).positional == "rope_llama"
    g = gguf_of(tmp_path, "glm4", meta={"glm4.rope.dimension_sections": [8, 12, 12, 0]})
    assert derive_mcd(g).positional == "rope_mrope"


def test_worker_4600_positional_table_has_no_conflicts() -> None:
    # Every SPEC-named variant is reachable, and the table maps names, not enum spellings.
    assert {"rope_llama", "rope_neox", "alibi"} <= set(POSITIONAL_BY_ARCH.values())
    assert all(name == name.lower() and " " not in name for name in POSITIONAL_BY_ARCH)


def test_worker_4600_quant_is_sorted_unique_tensor_types(tmp_path: Path) -> None:
    tensors = (
        ("a", (64, 2), GGMLType.Q8_0),
        ("b", (256,), GGMLType.Q4_K),
        ("c", (32,), GGMLType.F32),
        ("d", (64,), GGMLType.Q8_0),
        ("e", (32,), GGMLType.F16),
    )
    assert derive_mcd(gguf_of(tmp_path, tensors=tensors)).quant == ("F16", "F32", "Q4_K", "Q8_0")


@pytest.mark.parametrize(
    ("drop", "key"),
    [
        (("llama.context_length",), "llama.context_length"),
        (("llama.attention.head_count",), "llama.attention.head_count"),
        (("tokenizer.ggml.tokens",), "tokenizer.ggml.tokens or llama.vocab_size"),
        (("general.name",), "general.name"),
        (("general.architecture",), "general.architecture"),
    ],
)
def test_worker_4600_missing_metadata_names_the_key(tmp_path: Path, drop: tuple[str, ...], key: str) -> None:
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")) as err:
        derive_mcd(gguf_of(tmp_path, drop=drop))
    assert err.value.code is ErrorCode.MODEL_LOAD_FAILED


def test_worker_4600_missing_keys_listed_together(tmp_path: Path) -> None:
    g = gguf_of(tmp_path, drop=("llama.context_length", "llama.attention.head_count"))
    with pytest.raises(ModelLoadError) as err:
        derive_mcd(g)
    assert "llama.attention.head_count (needed for attention)" in err.value.message
    assert "llama.context_length (needed for context_max)" in err.value.message


def test_worker_4600_vocab_size_from_arch_key(tmp_path: Path) -> None:
    g = gguf_of(tmp_path, drop=("tokenizer.ggml.tokens",), meta={"llama.vocab_size": 32000})
    assert derive_mcd(g).vocab_size == 32000


def test_worker_4600_model_id_fallback_is_only_a_fallback(tmp_path: Path) -> None:
    assert derive_mcd(gguf_of(tmp_path), model_id="stem").model_id == "tiny"
    assert derive_mcd(gguf_of(tmp_path, drop=("general.name",)), model_id="stem").model_id == "stem"


def test_worker_4600_model_id_is_sanitised(tmp_path: Path) -> None:
    g = gguf_of(tmp_path, meta={"general.name": "evil\nINFO fake log line\x1b[31m" + "x" * 400})
    model_id = derive_mcd(g).model_id
    assert "\n" not in model_id and "\x1b" not in model_id and len(model_id) == 256


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        ({"llama.context_length": True}, "llama.context_length must be an integer"),
        ({"llama.context_length": 0}, "llama.context_length must be an integer >= 1"),
        ({"llama.context_length": "long"}, "llama.context_length must be an integer"),
        ({"general.architecture": "../../etc"}, "general.architecture must be a short name"),
    ],
)
def test_worker_4600_mistyped_metadata(tmp_path: Path, meta: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModelLoadError, match=needle):
        derive_mcd(gguf_of(tmp_path, meta=meta))


def test_worker_4600_no_tensors_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no tensors"):
        derive_mcd(gguf_of(tmp_path, tensors=()))


def test_worker_4600_mcd_to_dict_is_json() -> None:
    mcd = MCD("m", "rope_neox", "gqa", ("F32", "Q8_0"), 4096, 100, "qwen2")
    assert json.loads(json.dumps(mcd.to_dict())) == {
        "model_id": "m",
        "positional": "rope_neox",
        "attention": "gqa",
        "quant": ["F32", "Q8_0"],
        "context_max": 4096,
        "vocab_size": 100,
        "architecture": "qwen2",
    }


# --- sidecar ---------------------------------------------------------------------------------


def write_sidecar(model: Path, data: Any) -> Path:
    path = sidecar_path_for(model)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_worker_4600_sidecar_path_convention(tmp_path: Path) -> None:
    assert sidecar_path_for(tmp_path / "model.gguf") == tmp_path / "model.gguf.mcd.json"


def test_worker_4600_sidecar_agreeing_changes_nothing(tmp_path: Path) -> None:
    g = gguf_of(tmp_path)
    restated = {"positional": "rope_llama", "attention": "mha", "context_max": 256, "quant": ["F32"]}
    side = load_sidecar(write_sidecar(tmp_path / "m.gguf", restated))
    assert merge_sidecar(mcd_fields(g), side) == derive_mcd(g)
    assert merge_sidecar(derive_mcd(g), side) == derive_mcd(g)


def test_worker_4600_sidecar_fills_missing_fields(tmp_path: Path) -> None:
    g = gguf_of(tmp_path, drop=("llama.context_length", "llama.attention.head_count", "general.name"))
    mcd = merge_sidecar(mcd_fields(g, "stem"), {"context_max": 8192, "attention": "gqa", "model_id": "tiny-7b"})
    assert (mcd.context_max, mcd.attention, mcd.model_id) == (8192, "gqa", "tiny-7b")


def test_worker_4600_sidecar_names_positional_of_unlisted_arch(tmp_path: Path) -> None:
    partial = mcd_fields(gguf_of(tmp_path, "newarch"))
    assert merge_sidecar(partial, {}).positional == "unknown:newarch"
    assert merge_sidecar(partial, {"positional": "rope_neox"}).positional == "rope_neox"


def test_worker_4600_sidecar_quant_order_does_not_matter(tmp_path: Path) -> None:
    tensors = (("a", (32,), GGMLType.F32), ("b", (32,), GGMLType.Q8_0))
    g = gguf_of(tmp_path, tensors=tensors)
    assert merge_sidecar(mcd_fields(g), {"quant": ["Q8_0", "F32"]}).quant == ("F32", "Q8_0")


def test_worker_4600_sidecar_disagreement_names_field_and_values(tmp_path: Path) -> None:
    g = gguf_of(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        merge_sidecar(mcd_fields(g), {"context_max": 8192, "attention": "gqa", "quant": ["F32", "Q4_K"]})
    msg = err.value.message
    assert msg.startswith("model sidecar disagrees with the GGUF header on ")
    assert "context_max: GGUF says 256, sidecar says 8192" in msg
    assert "attention: GGUF says 'mha', sidecar says 'gqa'" in msg
    assert "quant: GGUF says [F32], sidecar says [F32, Q4_K]" in msg


def test_worker_4600_sidecar_model_id_must_agree_with_general_name(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model_id: GGUF says 'tiny', sidecar says 'other'"):
        merge_sidecar(mcd_fields(gguf_of(tmp_path)), {"model_id": "other"})


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"context_max": 256, "rope_theta": 1e4}, "rope_theta: Extra inputs are not permitted"),
        ({"context_max": "256"}, "context_max: Input should be a valid integer"),
        ({"context_max": True}, "context_max: Input should be a valid integer"),
        ({"context_max": 0}, "context_max: Input should be greater than or equal to 1"),
        ({"context_max": 1 << 40}, "context_max: Input should be less than or equal to"),
        ({"attention": "sparse"}, "attention: Input should be 'mha', 'gqa' or 'mqa'"),
        ({"positional": "rope_magic"}, "positional: Input should be"),
        ({"quant": ["Q4_K", "Q9_9"]}, "unknown ggml type"),
        ({"quant": ["F32", "F32"]}, "more than once"),
        ({"quant": []}, "quant: List should have at least 1 item"),
        ({"model_id": "a\nb"}, "model_id: String should match pattern"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_worker_4600_sidecar_validation(tmp_path: Path, data: Any, needle: str) -> None:
    path = write_sidecar(tmp_path / "m.gguf", data)
    with pytest.raises(ModelLoadError, match=r"sidecar .* is invalid|must hold") as err:
        load_sidecar(path)
    assert needle in err.value.message
    assert str(path) in err.value.message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "is not valid JSON"),
        ('{"context_max": 1, "context_max": 2}', "duplicate key 'context_max'"),
        ('{"context_max": NaN}', "NaN is not valid JSON"),
        ("", "is not valid JSON"),
    ],
)
def test_worker_4600_sidecar_bad_json(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ModelLoadError, match=needle):
        load_sidecar(write_sidecar(tmp_path / "m.gguf", text))


def test_worker_4600_sidecar_symlink_and_size_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    link = sidecar_path_for(tmp_path / "m.gguf")
    os.symlink(target, link)
    with pytest.raises(ModelLoadError, match="symlink"):
        load_sidecar(link)
    big = write_sidecar(tmp_path / "big.gguf", '{"model_id": "' + "x" * 70_000 + '"}')
    with pytest.raises(ModelLoadError, match="larger than 65536 bytes"):
        load_sidecar(big)


def test_worker_4600_validate_sidecar_returns_only_set_fields() -> None:
    got = validate_sidecar({"quant": ["Q8_0", "F32"], "vocab_size": 10})
    assert got == {"quant": ["F32", "Q8_0"], "vocab_size": 10}


# --- matching --------------------------------------------------------------------------------

MODEL = MCD("tiny", "rope_neox", "gqa", ("F32", "Q4_K"), 4096, 1000, "qwen2")
ENGINE = ECP(
    worker_id="w0",
    supports_positional=("rope_llama", "rope_neox"),
    supports_attention=("mha", "gqa"),
    supports_quant=("F32", "Q4_K", "Q8_0"),
    max_context=8192,
    vram_bytes=1 << 30,
    supports_architecture=("llama", "qwen2"),
)


def rules(mcd: MCD, ecp: ECP = ENGINE) -> list[str]:
    return [r.rule for r in match(mcd, ecp).rejections]


def test_worker_4620_baseline_accepted() -> None:
    result = match(MODEL, ENGINE)
    assert result.accepted and result.message == "" and require_match(MODEL, ENGINE) == result


def test_worker_4621_positional_rule() -> None:
    assert rules(replace(MODEL, positional="rope_llama")) == []
    assert rules(replace(MODEL, positional="alibi")) == ["positional"]


def test_worker_4621_attention_rule() -> None:
    assert rules(replace(MODEL, attention="mha")) == []
    assert rules(replace(MODEL, attention="mqa")) == ["attention"]


def test_worker_4621_quant_rule_any_of() -> None:
    # SPEC: at least one format supported; the extension quant_all still wants them all.
    assert rules(replace(MODEL, quant=("Q8_0",))) == []
    assert rules(replace(MODEL, quant=("IQ2_XS", "Q8_0"))) == ["quant_all"]
    assert rules(replace(MODEL, quant=("IQ2_XS", "Q2_K"))) == ["quant", "quant_all"]


def test_worker_4621_context_rule_is_inclusive() -> None:
    assert rules(replace(MODEL, context_max=8192)) == []
    assert rules(replace(MODEL, context_max=8193)) == ["context"]


def test_worker_4621_architecture_extension_rule() -> None:
    assert rules(replace(MODEL, architecture="llama")) == []
    assert rules(replace(MODEL, architecture="mamba")) == ["architecture"]


def test_worker_4622_rejection_text_shape_exact() -> None:
    bad = replace(MODEL, positional="alibi")
    (rej,) = match(bad, ENGINE).rejections
    assert rej.message == 'model "tiny" needs positional alibi; this engine supports [rope_llama, rope_neox]'
    assert (rej.rule, rej.required, rej.supported) == ("positional", "alibi", "[rope_llama, rope_neox]")


def test_worker_4622_every_rule_text_exact() -> None:
    bad = MCD("big", "alibi", "mqa", ("IQ2_XS", "Q2_K"), 131072, 10, "bloom")
    result = match(bad, ENGINE)
    assert [r.message for r in result.rejections] == [
        'model "big" needs positional alibi; this engine supports [rope_llama, rope_neox]',
        'model "big" needs attention mqa; this engine supports [mha, gqa]',
        'model "big" needs quant one of [IQ2_XS, Q2_K]; this engine supports [F32, Q4_K, Q8_0]',
        'model "big" needs context_max 131072; this engine supports up to 8192',
        'model "big" needs quant all of [IQ2_XS, Q2_K] (missing [IQ2_XS, Q2_K]); this engine supports [F32, Q4_K, Q8_0]',
        'model "big" needs architecture bloom; this engine supports [llama, qwen2]',
    ]
    rule_names = ["positional", "attention", "quant", "context", "quant_all", "architecture"]
    assert [r.rule for r in result.rejections] == rule_names


def test_worker_4622_quant_all_names_missing_types() -> None:
    (rej,) = match(replace(MODEL, quant=("F32", "IQ4_XS", "Q4_K")), ENGINE).rejections
    assert rej.message == (
        'model "tiny" needs quant all of [F32, IQ4_XS, Q4_K] (missing [IQ4_XS]); this engine supports [F32, Q4_K, Q8_0]'
    )


def test_worker_4623_require_match_raises_with_all_reasons() -> None:
    bad = replace(MODEL, attention="mqa", context_max=10**6)
    with pytest.raises(CapabilityError) as err:
        require_match(bad, ENGINE)
    assert err.value.code is ErrorCode.CAPABILITY_MISMATCH
    assert err.value.http_status == 422
    assert err.value.message == (
        'model "tiny" needs attention mqa; this engine supports [mha, gqa]; '
        'model "tiny" needs context_max 1000000; this engine supports up to 8192'
    )


def test_worker_4623_unknown_arch_rejected_twice(tmp_path: Path) -> None:
    mcd = derive_mcd(gguf_of(tmp_path, "frobnicator"))
    assert rules(mcd, build_ecp("w", 0)) == ["positional", "architecture"]


def test_worker_4623_match_result_to_dict() -> None:
    d = match(replace(MODEL, attention="mqa"), ENGINE).to_dict()
    assert d["accepted"] is False
    assert d["rejections"] == [
        {
            "rule": "attention",
            "required": "mqa",
            "supported": "[mha, gqa]",
            "message": 'model "tiny" needs attention mqa; this engine supports [mha, gqa]',
        }
    ]


# --- engine profile -> ECP ------------------------------------------------------------------------


def test_worker_4610_build_ecp_from_profile() -> None:
    """The ECP carries the engine profile unchanged (what it holds is tested in test_ecp_truth.py)."""
    ecp = build_ecp("gpu-0", 80 << 30)
    assert ecp.worker_id == "gpu-0" and ecp.vram_bytes == 80 << 30
    p = ENGINE_PROFILE
    assert (ecp.supports_positional, ecp.supports_attention, ecp.supports_quant) == (p.positional, p.attention, p.quant)
    assert (ecp.supports_architecture, ecp.max_context) == (p.architectures, p.max_context)
    d = json.loads(json.dumps(ecp.to_dict()))
    assert d["supports_quant"] == list(ENGINE_PROFILE.quant) and d["vram_bytes"] == 80 << 30
    # the types with no fused matmul are a named subset of supports_quant (dequantized at load)
    assert d["quant_dequantized_at_load"] == list(p.quant_dequantized_at_load) == ["Q2_K", "Q3_K"]
    assert set(p.quant_dequantized_at_load) <= set(p.quant)


def test_worker_4611_profile_names_only_known_things() -> None:
    assert set(ENGINE_PROFILE.quant) <= {t.name for t in GGMLType}
    assert set(ENGINE_PROFILE.attention) <= {"mha", "gqa", "mqa"}
    assert all(POSITIONAL_BY_ARCH[a] in ENGINE_PROFILE.positional for a in ENGINE_PROFILE.architectures)


def test_worker_4610_custom_profile_and_bad_args() -> None:
    tiny = EngineProfile(("llama",), ("rope_llama",), ("mha",), ("F32",), 2048)
    assert build_ecp("w", 0, tiny).supports_quant == ("F32",)
    with pytest.raises(InvalidParams):
        build_ecp("", 0)
    with pytest.raises(InvalidParams):
        build_ecp("w", -1)
