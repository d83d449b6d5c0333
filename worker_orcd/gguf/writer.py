"""Minimal GGUF v3 writer for tests and synthetic benchmark models.

Our own so the device machine (which lacks the ``gguf`` package) can write
multi-GB models of real shapes; tensor data is produced lazily per tensor so
a 15 GB file never sits in host RAM.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .constants import BLOCK_LAYOUT, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS, SCALAR_FORMATS, GGMLType, ValueType

TensorData = bytes | bytearray | memoryview | Callable[[], Iterable[bytes]]


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    n_bytes: int
    data: TensorData


_UINT32 = range(2**32)
_INT64 = range(-(2**63), 2**63)
_UINT64 = range(2**64)


def _infer_int_type(values: Iterable[int]) -> ValueType:
    """UINT32 when every value fits, else INT64, else UINT64; pass a type explicitly for anything else."""
    lo = hi = 0
    for v in values:
        lo, hi = min(lo, v), max(hi, v)
    for vtype, rng in ((ValueType.UINT32, _UINT32), (ValueType.INT64, _INT64), (ValueType.UINT64, _UINT64)):
        if lo in rng and hi in rng:
            return vtype
    raise ValueError(f"integer {lo if lo not in _INT64 else hi} does not fit in 64 bits")


def _infer_type(value: Any) -> ValueType:
    if isinstance(value, bool):
        return ValueType.BOOL
    if isinstance(value, int):
        return _infer_int_type((value,))
    if isinstance(value, float):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, (list, tuple)):
        return ValueType.ARRAY
    raise TypeError(f"cannot infer a GGUF type for {type(value).__name__}")


def _infer_element_type(items: Any) -> ValueType:
    """One element type for a whole array (empty arrays are written as UINT32)."""
    if not len(items):
        return ValueType.UINT32
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return _infer_int_type(items)
    kinds = {_infer_type(x) for x in items}
    if len(kinds) != 1:
        raise TypeError(f"array mixes element types {sorted(k.name for k in kinds)}; pass element_type")
    return kinds.pop()


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLType) -> int:
    if not 1 <= len(shape) <= MAX_DIMS or any(d <= 0 for d in shape):
        raise ValueError(f"shape {list(shape)} must have 1..{MAX_DIMS} positive dimensions")
    layout = BLOCK_LAYOUT[ggml_type]
    n = 1
    for d in shape:
        n *= d
    if shape[0] % layout.block_size:
        raise ValueError(f"row length {shape[0]} not a multiple of {ggml_type.name} block size {layout.block_size}")
    return n // layout.block_size * layout.type_size


class GGUFWriter:
    """Builds a GGUF in memory (header) and streams tensor data to a file.

    ``version`` is written as given, so tests can produce files the reader must refuse.
    """

    def __init__(self, alignment: int = DEFAULT_ALIGNMENT, version: int = 3) -> None:
        if alignment <= 0 or alignment & (alignment - 1) or alignment >= 2**32:
            raise ValueError(f"alignment must be a power of two below 2**32, got {alignment}")
        self.alignment = alignment
        self.version = version
        self.kv: list[tuple[str, ValueType, Any, ValueType | None]] = []
        self.tensors: list[_Tensor] = []
        if alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", alignment, ValueType.UINT32)

    def add(self, key: str, value: Any, vtype: ValueType | None = None, element_type: ValueType | None = None) -> None:
        if any(k == key for k, *_ in self.kv):
            raise ValueError(f"duplicate metadata key {key!r}")
        if vtype is None:  # not `or`: ValueType.UINT8 is 0, i.e. falsy
            vtype = _infer_type(value)
        if vtype is ValueType.ARRAY and element_type is None:
            element_type = _infer_element_type(value)
        self.kv.append((key, vtype, value, element_type))

    def add_tensor(self, name: str, shape: tuple[int, ...], ggml_type: GGMLType, data: TensorData) -> None:
        """``shape`` in ggml order (ne[0] fastest); ``data`` raw block bytes or a chunk generator."""
        if any(t.name == name for t in self.tensors):
            raise ValueError(f"duplicate tensor name {name!r}")
        n_bytes = tensor_nbytes(tuple(shape), ggml_type)
        if not callable(data) and len(data) != n_bytes:
            raise ValueError(f"{name}: {len(data)} bytes given, {n_bytes} expected for {ggml_type.name}{list(shape)}")
        self.tensors.append(_Tensor(name, tuple(shape), ggml_type, n_bytes, data))

    # --- encoding -----------------------------------------------------------------
    @staticmethod
    def _string(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw

    def _value(self, vtype: ValueType, value: Any, element_type: ValueType | None) -> bytes:
        if vtype is ValueType.STRING:
            return self._string(value)
        if vtype is ValueType.ARRAY:
            assert element_type is not None
            out = [struct.pack("<IQ", element_type, len(value))]
            for item in value:
                sub = _infer_element_type(item) if element_type is ValueType.ARRAY else None
                out.append(self._value(element_type, item, sub))
            return b"".join(out)
        fmt, _ = SCALAR_FORMATS[vtype]
        return struct.pack(fmt, int(value) if vtype is ValueType.BOOL else value)

    def _pad(self, n: int) -> int:
        return (-n) % self.alignment

    def header_bytes(self) -> bytes:
        out = [GGUF_MAGIC, struct.pack("<IQQ", self.version, len(self.tensors), len(self.kv))]
        for key, vtype, value, etype in self.kv:
            out.append(self._string(key) + struct.pack("<I", vtype) + self._value(vtype, value, etype))
        offset = 0
        for t in self.tensors:
            out.append(self._string(t.name) + struct.pack("<I", len(t.shape)))
            out.append(struct.pack(f"<{len(t.shape)}Q", *t.shape))
            out.append(struct.pack("<IQ", t.ggml_type, offset))
            offset += t.n_bytes + self._pad(t.n_bytes)
        head = b"".join(out)
        return head + b"\0" * self._pad(len(head))

    def write_to(self, fh: BinaryIO) -> None:
        fh.write(self.header_bytes())
        for t in self.tensors:
            written = 0
            chunks = t.data() if callable(t.data) else (t.data,)
            for chunk in chunks:
                fh.write(chunk)
                written += len(chunk)
            if written != t.n_bytes:
                raise ValueError(f"{t.name}: generator produced {written} bytes, expected {t.n_bytes}")
            fh.write(b"\0" * self._pad(t.n_bytes))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        with open(path, "wb") as fh:
            self.write_to(fh)
        return path
