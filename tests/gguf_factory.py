"""Byte-level builders for small GGUF images, valid and hostile, used by the GGUF tests.

Hostile files need fields no honest writer emits (wrong counts, bad enums,
lengths that lie), so these helpers encode every piece by hand; ``int_fields``
maps where each integer field of a well-formed image lives so fuzzers can
target lengths and counts instead of flipping random bytes only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker_orcd.gguf.constants import BLOCK_LAYOUT, SCALAR_FORMATS, GGMLType, ValueType

U64_MAX = 2**64 - 1


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; ``length`` overrides the stored length (to make it lie)."""
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return u64(len(raw) if length is None else length) + raw


def scalar(vtype: ValueType, value: Any) -> bytes:
    fmt, _ = SCALAR_FORMATS[vtype]
    return struct.pack(fmt, int(value) if vtype is ValueType.BOOL else value)


def value(vtype: ValueType, v: Any, etype: ValueType | None = None) -> bytes:
    """Encoded value body (no type tag). Arrays take a list and their element type."""
    if vtype is ValueType.STRING:
        return gstr(v)
    if vtype is ValueType.ARRAY:
        assert etype is not None
        return array_body(etype, v)
    return scalar(vtype, v)


def array_body(etype: ValueType, items: list[Any], count: int | None = None, inner: ValueType | None = None) -> bytes:
    """Element type + length + elements; ``inner`` is the element type of nested arrays."""
    n = len(items) if count is None else count
    return u32(etype) + u64(n) + b"".join(value(etype, x, inner) for x in items)


def kv(key: str | bytes, vtype: ValueType | int, body: bytes) -> bytes:
    """One metadata pair from an already encoded value body."""
    return gstr(key) + u32(int(vtype)) + body


def kv_value(key: str, vtype: ValueType, v: Any, etype: ValueType | None = None) -> bytes:
    return kv(key, vtype, value(vtype, v, etype))


def tensor_info(name: str | bytes, dims: list[int], ggml_type: GGMLType | int, offset: int, n_dims: int | None = None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return gstr(name) + u32(n) + b"".join(u64(d) for d in dims) + u32(int(ggml_type)) + u64(offset)


def nbytes(dims: list[int], ggml_type: GGMLType) -> int:
    layout = BLOCK_LAYOUT[ggml_type]
    n = 1
    for d in dims:
        n *= d
    return n // layout.block_size * layout.type_size


def image(
    kvs: Sequence[bytes] = (),
    tensors: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
    magic: bytes = b"GGUF",
) -> bytes:
    """Header + metadata + tensor infos, padded to ``alignment`` when data follows, + data."""
    head = magic + u32(version) + u64(len(tensors) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    if not data:
        return head
    return head + b"\0" * (-len(head) % alignment) + data


def valid_image() -> bytes:
    """A small well-formed file: two scalar KVs, a string array, one F32 and one Q8_0 tensor."""
    kvs = [
        kv_value("general.architecture", ValueType.STRING, "llama"),
        kv_value("llama.block_count", ValueType.UINT32, 1),
        kv_value("tokenizer.ggml.tokens", ValueType.ARRAY, ["a", "b", "<s>"], ValueType.STRING),
    ]
    tensors = [tensor_info("a.weight", [8], GGMLType.F32, 0), tensor_info("b.weight", [32, 2], GGMLType.Q8_0, 32)]
    return image(kvs, tensors, bytes(32) + bytes(nbytes([32, 2], GGMLType.Q8_0)))


def write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def gguf_package_seed(path: Path) -> Path:
    """The fuzz seed, written by llama.cpp's own ``gguf.GGUFWriter`` (an independent encoder)."""
    import gguf
    import numpy as np

    V = gguf.GGUFValueType
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_int8("t.i8", -3)
    w.add_uint16("t.u16", 65535)
    w.add_int64("t.i64", -(2**40))
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_float32("t.f32", 1.5)
    w.add_float64("t.f64", -2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "ü", "▁the"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, 3.0, 4.0])
    w.add_key_value("t.bools", [True, False, True], V.ARRAY, V.BOOL)
    w.add_key_value("t.nested", [[1, 2], [3], [4, 5, 6]], V.ARRAY)
    w.add_key_value("t.nested_str", [["x", "yy"], ["zzz"]], V.ARRAY)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal(8).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 16)).astype(np.float16))
    w.add_tensor("q8_0", rng.integers(0, 256, (2, 34), dtype=np.uint8), raw_dtype=Q.Q8_0)
    w.add_tensor("q4_k", rng.integers(0, 256, (1, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass(frozen=True)
class IntField:
    offset: int
    width: int  # 4 or 8 bytes
    kind: str  # "count", "length", "type", "n_dims", "dim", "offset", "version"


def int_fields(blob: bytes) -> list[IntField]:
    """Every integer field of a well-formed GGUF image, by a walk independent of the reader."""
    out: list[IntField] = []
    pos = 0

    def take(width: int, kind: str) -> int:
        nonlocal pos
        out.append(IntField(pos, width, kind))
        (v,) = struct.unpack_from("<I" if width == 4 else "<Q", blob, pos)
        pos += width
        return v

    def skip_string() -> None:
        nonlocal pos
        n = take(8, "length")
        pos += n

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype == ValueType.STRING:
            skip_string()
        elif vtype == ValueType.ARRAY:
            etype = take(4, "type")
            for _ in range(take(8, "count")):
                skip_value(etype)
        else:
            pos += SCALAR_FORMATS[ValueType(vtype)][1]

    pos = 4
    take(4, "version")
    n_tensors = take(8, "count")
    n_kv = take(8, "count")
    for _ in range(n_kv):
        skip_string()
        skip_value(take(4, "type"))
    for _ in range(n_tensors):
        skip_string()
        for _ in range(take(4, "n_dims")):
            take(8, "dim")
        take(4, "type")
        take(8, "offset")
    return out


# --- the reference view: what llama.cpp's gguf-py reads from the same file -----------------


@dataclass(frozen=True)
class ReferenceTensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    data_offset: int
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class ReferenceView:
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    value_types: dict[str, int]
    array_types: dict[str, int]
    tensors: list[ReferenceTensor]


def _decode_parts(vtype: int, parts: Any) -> Any:
    """Rebuild a value from gguf-py's flat part list (its ``contents()`` flattens nested arrays)."""
    import gguf

    V = gguf.GGUFValueType
    if vtype == V.STRING:
        next(parts)
        return bytes(next(parts)).decode("utf-8")
    if vtype == V.ARRAY:
        etype = int(next(parts)[0])
        n = int(next(parts)[0])
        if etype not in (V.STRING, V.ARRAY):  # scalars: one part per element
            return [next(parts)[0].item() for _ in range(n)]
        return [_decode_parts(etype, parts) for _ in range(n)]
    return next(parts)[0].item()


def reference_view(path: Path) -> ReferenceView:
    import gguf

    r = gguf.GGUFReader(str(path))
    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    array_types: dict[str, int] = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):  # gguf-py's pseudo-fields for the fixed header
            continue
        vtype = int(f.parts[2][0])
        value_types[key] = vtype
        if vtype == gguf.GGUFValueType.ARRAY:
            array_types[key] = int(f.parts[3][0])
        metadata[key] = _decode_parts(vtype, iter(f.parts[3:]))
    tensors = [
        ReferenceTensor(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_elements), int(t.n_bytes))
        for t in r.tensors
    ]
    version = int(r.fields["GGUF.version"].parts[0][0])
    return ReferenceView(version, int(r.alignment), int(r.data_offset), metadata, value_types, array_types, tensors)


def assert_same_value(ours: Any, theirs: Any, where: str) -> None:
    """Equal value and equal Python type (so True never passes for 1), lists element-wise."""
    if isinstance(theirs, list):
        assert isinstance(ours, list), where
        assert len(ours) == len(theirs), where
        if ours != theirs:  # the fast path keeps 150k-element arrays cheap
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert_same_value(a, b, f"{where}[{i}]")
        types_ours = {type(x) for x in ours if not isinstance(x, list)}
        types_theirs = {type(x) for x in theirs if not isinstance(x, list)}
        assert types_ours == types_theirs, where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if isinstance(b, list):
                assert_same_value(a, b, f"{where}[{i}]")
        return
    assert type(ours) is type(theirs), f"{where}: {type(ours).__name__} != {type(theirs).__name__}"
    assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def assert_agrees_with_reference(ours: Any, ref: ReferenceView) -> None:
    """Field-by-field agreement of our ``GGUFFile`` with gguf-py's reading of the same file."""
    assert ours.version == ref.version
    assert ours.alignment == ref.alignment
    assert ours.data_offset == ref.data_offset
    assert list(ours.metadata) == list(ref.metadata)  # same keys, same order
    for key, value in ref.metadata.items():
        assert int(ours.value_types[key]) == ref.value_types[key], key
        assert_same_value(ours.metadata[key], value, key)
    assert {k: int(v) for k, v in ours.array_types.items()} == ref.array_types
    assert len(ours.tensors) == len(ref.tensors)
    for t, r in zip(ours.tensors, ref.tensors):
        got = ReferenceTensor(t.name, t.shape, int(t.ggml_type), t.data_offset, t.n_elements, t.n_bytes)
        assert got == r
