"""Our GGUFWriter's output is read identically by gguf-py's GGUFReader and by our reader.

The writer produces every synthetic model the benchmarks and GPU tests load,
so an encoding slip here would silently test the wrong thing; gguf-py is the
independent judge of what the bytes mean.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gguf_factory as F
from worker_orcd.gguf import GGMLType, GGUFFormatError, ValueType, parse_file
from worker_orcd.gguf.writer import GGUFWriter, tensor_nbytes

V = ValueType
ALL_SCALARS: dict[ValueType, Any] = {
    V.UINT8: 255,
    V.INT8: -128,
    V.UINT16: 65535,
    V.INT16: -32768,
    V.UINT32: 2**32 - 1,
    V.INT32: -(2**31),
    V.UINT64: 2**64 - 1,
    V.INT64: -(2**63),
    V.FLOAT32: -1.25,
    V.FLOAT64: 1e300,
    V.BOOL: True,
    V.STRING: "ünïcödé ✓ \u0000 nul inside",
}
TENSORS = [("f32", (8, 2), GGMLType.F32), ("f16", (16,), GGMLType.F16), ("bf16", (4, 3), GGMLType.BF16),
           ("q8_0", (64, 2), GGMLType.Q8_0), ("q4_k", (256,), GGMLType.Q4_K), ("q6_k", (256, 2), GGMLType.Q6_K)]


def _full_writer(alignment: int) -> tuple[GGUFWriter, dict[str, Any], dict[str, bytes]]:
    w = GGUFWriter(alignment=alignment)
    expected: dict[str, Any] = {} if alignment == 32 else {"general.alignment": alignment}
    w.add("general.architecture", "llama")
    expected["general.architecture"] = "llama"
    for vtype, value in ALL_SCALARS.items():
        key = f"t.{vtype.name.lower()}"
        w.add(key, value, vtype)
        expected[key] = value
    for vtype, value in ALL_SCALARS.items():  # one array of each element type
        key = f"t.arr_{vtype.name.lower()}"
        items = [value, value] if vtype is not V.BOOL else [True, False, True]
        w.add(key, items, V.ARRAY, vtype)
        expected[key] = items
    nested = {"t.nested": [[1, 2], [3], []], "t.nested_str": [["a", "bb"], ["ccc"]], "t.deep": [[[[-1]]], [[[2, 3]]]], "t.empty": []}
    for key, value in nested.items():
        w.add(key, value)
        expected[key] = value
    rng = np.random.default_rng(1)
    data: dict[str, bytes] = {}
    for name, shape, gtype in TENSORS:
        data[name] = rng.integers(0, 256, tensor_nbytes(shape, gtype), dtype=np.uint8).tobytes()
        w.add_tensor(name, shape, gtype, data[name])
    return w, expected, data


@pytest.mark.parametrize("alignment", [32, 8, 64, 4096])
def test_worker_4312_writer_round_trip_all_types(tmp_path: Path, alignment: int) -> None:
    w, expected, data = _full_writer(alignment)
    path = w.write(tmp_path / "all.gguf")
    ours = parse_file(path)
    ref = F.reference_view(path)
    F.assert_agrees_with_reference(ours, ref)
    for key, value in expected.items():
        F.assert_same_value(ours.metadata[key], value, key)
    assert ours.alignment == alignment and ours.data_offset % alignment == 0
    assert ours.value_types["t.nested"] is V.ARRAY and ours.array_types["t.nested"] is V.ARRAY
    assert ours.array_types["t.arr_string"] is V.STRING and ours.array_types["t.empty"] is V.UINT32
    blob = path.read_bytes()
    for t in ours.tensors:
        assert t.data_offset % alignment == 0
        assert blob[t.data_offset : t.data_offset + t.n_bytes] == data[t.name]
    assert [(t.name, t.shape, t.ggml_type) for t in ours.tensors] == [(n, s, g) for n, s, g in TENSORS]
    assert len(blob) % alignment == 0


def test_worker_4312_writer_streams_chunked_tensor_data(tmp_path: Path) -> None:
    w = GGUFWriter()
    w.add_tensor("w", (1024, 4), GGMLType.F32, lambda: (bytes([i]) * 4096 for i in range(4)))
    path = w.write(tmp_path / "chunks.gguf")
    t = parse_file(path).tensor("w")
    raw = path.read_bytes()[t.data_offset : t.data_offset + t.n_bytes]
    assert raw == b"".join(bytes([i]) * 4096 for i in range(4))
    F.assert_agrees_with_reference(parse_file(path), F.reference_view(path))


def test_worker_4312_writer_short_generator_refused(tmp_path: Path) -> None:
    w = GGUFWriter()
    w.add_tensor("w", (8,), GGMLType.F32, lambda: iter([b"\0" * 16]))
    with pytest.raises(ValueError, match="produced 16 bytes, expected 32"):
        w.write(tmp_path / "short.gguf")


@pytest.mark.parametrize("version", [2, 3])
def test_worker_4312_writer_versions(tmp_path: Path, version: int) -> None:
    w = GGUFWriter(version=version)
    w.add("general.architecture", "llama")
    assert parse_file(w.write(tmp_path / "v.gguf")).version == version


def test_worker_4312_writer_can_write_what_the_reader_refuses(tmp_path: Path) -> None:
    """``version`` is written as given, so tests can build refusals from valid bodies."""
    w = GGUFWriter(version=4)
    w.add("general.architecture", "llama")
    with pytest.raises(GGUFFormatError) as ei:
        parse_file(w.write(tmp_path / "v4.gguf"))
    assert (ei.value.field, ei.value.offset) == ("version", 4)


def test_worker_4312_writer_refuses_bad_input() -> None:
    for alignment in (0, 3, 48, -32, 2**32):
        with pytest.raises(ValueError, match="alignment"):
            GGUFWriter(alignment=alignment)
    w = GGUFWriter()
    w.add("k", 1)
    with pytest.raises(ValueError, match="duplicate metadata key"):
        w.add("k", 2)
    w.add_tensor("t", (8,), GGMLType.F32, bytes(32))
    with pytest.raises(ValueError, match="duplicate tensor name"):
        w.add_tensor("t", (8,), GGMLType.F32, bytes(32))
    with pytest.raises(ValueError, match="31 bytes given, 32 expected"):
        w.add_tensor("u", (8,), GGMLType.F32, bytes(31))
    for shape in ((), (0,), (8, -1), (1, 1, 1, 1, 1)):
        with pytest.raises(ValueError, match="positive dimensions"):
            w.add_tensor("v", shape, GGMLType.F32, bytes(0))
    with pytest.raises(ValueError, match="block size 32"):
        w.add_tensor("q", (16,), GGMLType.Q8_0, bytes(17))
    with pytest.raises(TypeError, match="mixes element types"):
        w.add("mixed", [1, "a"])
    with pytest.raises(TypeError, match="cannot infer"):
        w.add("obj", object())
    with pytest.raises(ValueError, match="64 bits"):
        w.add("big", 2**64)


def test_worker_4312_writer_infers_integer_element_types(tmp_path: Path) -> None:
    w = GGUFWriter()
    cases = {"u32": ([0, 2**32 - 1], V.UINT32), "i64": ([-1, 5], V.INT64), "wide": ([1, 2**40], V.INT64), "u64": ([0, 2**64 - 1], V.UINT64)}
    for key, (items, _) in cases.items():
        w.add(key, items)
    w.add("neg", -5)
    g = parse_file(w.write(tmp_path / "ints.gguf"))
    assert {k: g.array_types[k] for k in cases} == {k: t for k, (_, t) in cases.items()}
    assert g.value_types["neg"] is V.INT64 and g.metadata["neg"] == -5


# --- property: anything the writer accepts, both readers read back unchanged ----------------------

_INT_RANGES = {V.UINT8: 8, V.UINT16: 16, V.UINT32: 32, V.UINT64: 64}
_SINT_RANGES = {V.INT8: 8, V.INT16: 16, V.INT32: 32, V.INT64: 64}


def _values_of(vtype: ValueType) -> st.SearchStrategy[Any]:
    if vtype in _INT_RANGES:
        return st.integers(0, 2 ** _INT_RANGES[vtype] - 1)
    if vtype in _SINT_RANGES:
        bits = _SINT_RANGES[vtype]
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if vtype is V.FLOAT32:
        return st.floats(width=32, allow_nan=False)
    if vtype is V.FLOAT64:
        return st.floats(allow_nan=False)
    if vtype is V.BOOL:
        return st.booleans()
    return st.text(max_size=12)


_SCALAR_TYPES = [v for v in ValueType if v is not V.ARRAY]


@st.composite
def _entry(draw: st.DrawFn) -> tuple[ValueType, Any, ValueType | None]:
    kind = draw(st.sampled_from(["scalar", "array", "nested"]))
    if kind == "scalar":
        vtype = draw(st.sampled_from(_SCALAR_TYPES))
        return vtype, draw(_values_of(vtype)), None
    if kind == "array":
        etype = draw(st.sampled_from(_SCALAR_TYPES))
        return V.ARRAY, draw(st.lists(_values_of(etype), max_size=6)), etype
    inner = st.one_of(st.lists(st.text(max_size=4), min_size=1, max_size=3), st.lists(st.integers(0, 1000), min_size=1, max_size=3))
    return V.ARRAY, draw(st.lists(inner, min_size=1, max_size=4)), V.ARRAY


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_entry(), max_size=8), st.sampled_from([8, 32, 256]), st.integers(1, 3))
def test_worker_4312_writer_property_round_trip(entries: list[tuple[ValueType, Any, ValueType | None]], alignment: int, n_tensors: int) -> None:
    w = GGUFWriter(alignment=alignment)
    for i, (vtype, value, etype) in enumerate(entries):
        w.add(f"k.{i}", value, vtype, etype)
    for i in range(n_tensors):
        w.add_tensor(f"t{i}", (32 * (i + 1),), GGMLType.Q8_0, bytes(34 * (i + 1)))
    with tempfile.TemporaryDirectory() as d:
        path = w.write(Path(d) / "p.gguf")
        ours = parse_file(path)
        F.assert_agrees_with_reference(ours, F.reference_view(path))
    for i, (vtype, value, etype) in enumerate(entries):
        key = f"k.{i}"
        assert ours.value_types[key] is vtype
        if vtype is V.FLOAT32:
            value = struct.unpack("<f", struct.pack("<f", value))[0]
        F.assert_same_value(ours.metadata[key], value, key)
        if etype is not None:
            assert ours.array_types[key] is etype
