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

from .constants import BLOCK_LAYOUT, DEFAULT_ALIGNMENT, GGUF_MAGIC, SCALAR_FORMATS, GGMLType, ValueType

TensorData = bytes | bytearray | memoryview | Callable[[], Iterable[bytes]]


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    n_bytes: int
    data: TensorData


def _infer_type(value: Any) -> ValueType:
    if isinstance(value, bool):
        return ValueType.BOOL
    if isinstance(value, int):
        return ValueType.UINT32 if 0 <= value < 2**32 else ValueType.INT64
    if isinstance(value, float):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, (list, tuple)):
        return ValueType.ARRAY
    raise TypeError(f"cannot infer a GGUF type for {type(value).__name__}")


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLType) -> int:
    layout = BLOCK_LAYOUT[ggml_type]
    n = 1
    for d in shape:
        n *= d
    if shape[0] % layout.block_size:
        raise ValueError(f"row length {shape[0]} not a multiple of {ggml_type.name} block size {layout.block_size}")
    return n // layout.block_size * layout.type_size


class GGUFWriter:
    def __init__(self, alignment: int = DEFAULT_ALIGNMENT, version: int = 3) -> None:
        self.alignment = alignment
        self.version = version
        self.kv: list[tuple[str, ValueType, Any, ValueType | None]] = []
        self.tensors: list[_Tensor] = []
        if alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", alignment, ValueType.UINT32)

    def add(self, key: str, value: Any, vtype: ValueType | None = None, element_type: ValueType | None = None) -> None:
        vtype = vtype or _infer_type(value)
        if vtype is ValueType.ARRAY and element_type is None:
            element_type = _infer_type(value[0]) if len(value) else ValueType.UINT32
        self.kv.append((key, vtype, value, element_type))

    def add_tensor(self, name: str, shape: tuple[int, ...], ggml_type: GGMLType, data: TensorData) -> None:
        """``shape`` in ggml order (ne[0] fastest); ``data`` raw block bytes or a chunk generator."""
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
                sub = _infer_type(item[0]) if element_type is ValueType.ARRAY and item else None
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
