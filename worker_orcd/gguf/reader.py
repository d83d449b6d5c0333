"""Defensive GGUF v2/v3 header reader (SPEC 4310-4312, 4224-4225).

Hand-written because no library parses untrusted GGUF safely: gguf-py maps the
whole file with numpy views and trusts every length field. Here every read is
bounds-checked against the file size, every count against a limit before any
allocation, and every failure is one ``GGUFFormatError`` naming the byte
offset and the field. Only the header is read (through mmap), so parsing cost
does not grow with tensor bytes.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ModelLoadError
from .constants import (
    BLOCK_LAYOUT,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MAX_DIMS,
    SCALAR_FORMATS,
    SUPPORTED_VERSIONS,
    GGMLType,
    Limits,
    ValueType,
)

_INT64_MAX = (1 << 63) - 1
MAX_TENSOR_NAME_BYTES = 256
# Smallest encoding of one array element of each type: lets us refuse an array
# whose declared length cannot fit in the remaining bytes before allocating it.
_MIN_ELEMENT_BYTES = {vt: size for vt, (_, size) in SCALAR_FORMATS.items()}
_MIN_ELEMENT_BYTES[ValueType.STRING] = 8
_MIN_ELEMENT_BYTES[ValueType.ARRAY] = 12


class GGUFFormatError(ModelLoadError):
    """The file is not a GGUF this worker accepts. Always MODEL_LOAD_FAILED."""

    def __init__(self, reason: str, *, offset: int, field: str) -> None:
        self.offset = offset
        self.field = field
        self.reason = reason
        super().__init__(f"invalid GGUF: {field} at byte offset {offset}: {reason}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] (ne[0]) varies fastest
    ggml_type: GGMLType
    offset: int  # as stored: relative to the start of the data section
    data_offset: int  # absolute byte offset of the first byte in the file
    n_elements: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


@dataclass(frozen=True)
class GGUFFile:
    version: int
    file_size: int
    alignment: int
    data_offset: int  # absolute start of the tensor data section
    header_size: int  # bytes of header + metadata + tensor infos (before padding)
    metadata: dict[str, Any]  # scalars as int/float/bool/str, arrays as (nested) lists
    value_types: dict[str, ValueType]  # the stored type of each value
    array_types: dict[str, ValueType]  # element type of each top-level array value
    tensors: tuple[TensorInfo, ...]  # in header order
    _by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({t.name: t for t in self.tensors})

    def tensor(self, name: str) -> TensorInfo:
        return self._by_name[name]

    def has_tensor(self, name: str) -> bool:
        return name in self._by_name

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_value(self, key: str, default: Any = None) -> Any:
        """``{arch}.{key}`` from the metadata, e.g. ``arch_value('block_count')``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: memoryview | bytes, limits: Limits) -> None:
        self.buf = buf
        self.end = len(buf)
        self.pos = 0
        self.limits = limits

    def fail(self, field: str, reason: str, offset: int | None = None) -> GGUFFormatError:
        return GGUFFormatError(reason, offset=self.pos if offset is None else offset, field=field)

    def need(self, n: int, field: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(field, f"needs {n} bytes but only {self.end - self.pos} remain before end of file")

    def scalar(self, vtype: ValueType, field: str) -> Any:
        fmt, size = SCALAR_FORMATS[vtype]
        self.need(size, field)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        if vtype is ValueType.BOOL and value not in (0, 1):
            raise self.fail(field, f"bool byte must be 0 or 1, got {value}")
        self.pos += size
        return bool(value) if vtype is ValueType.BOOL else value

    def u32(self, field: str) -> int:
        return self.scalar(ValueType.UINT32, field)

    def u64(self, field: str) -> int:
        return self.scalar(ValueType.UINT64, field)

    def string(self, field: str, max_bytes: int | None = None) -> str:
        start = self.pos
        length = self.u64(f"{field} length")
        cap = self.limits.max_string_bytes if max_bytes is None else max_bytes
        if length > cap:
            raise self.fail(field, f"string length {length} exceeds the limit of {cap} bytes", start)
        self.need(length, field)
        raw = bytes(self.buf[self.pos : self.pos + length])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(field, f"string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        self.pos += length
        return text

    def value_type(self, field: str) -> ValueType:
        start = self.pos
        raw = self.u32(f"{field} type")
        try:
            return ValueType(raw)
        except ValueError:
            raise self.fail(field, f"unknown metadata value type {raw}", start) from None

    def value(self, vtype: ValueType, field: str, depth: int = 0) -> Any:
        if vtype is ValueType.STRING:
            return self.string(field)
        if vtype is ValueType.ARRAY:
            return self.array(field, depth + 1)[1]
        return self.scalar(vtype, field)

    def array(self, field: str, depth: int) -> tuple[ValueType, list[Any]]:
        if depth > self.limits.max_array_nesting:
            raise self.fail(field, f"arrays nested deeper than {self.limits.max_array_nesting} levels")
        etype = self.value_type(f"{field} element")
        start = self.pos
        count = self.u64(f"{field} array length")
        if count > self.limits.max_array_len:
            raise self.fail(field, f"array length {count} exceeds the limit of {self.limits.max_array_len}", start)
        min_bytes = count * _MIN_ELEMENT_BYTES[etype]
        if self.pos + min_bytes > self.end:
            raise self.fail(field, f"array of {count} {etype.name} elements cannot fit in the {self.end - self.pos} bytes left", start)
        if etype in SCALAR_FORMATS and etype is not ValueType.BOOL:
            fmt, size = SCALAR_FORMATS[etype]
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
            self.pos += count * size
            return etype, values
        return etype, [self.value(etype, f"{field}[{i}]", depth) for i in range(count)]


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def parse_buffer(buf: memoryview | bytes, limits: Limits = Limits()) -> GGUFFile:
    """Parse a GGUF image held in ``buf`` (the whole file, or an mmap of it)."""
    cur = _Cursor(buf, limits)
    file_size = cur.end
    if file_size > limits.max_file_size:
        raise cur.fail("file_size", f"file is {file_size} bytes, larger than the cap MAX_MODEL_SIZE={limits.max_file_size}", 0)
    cur.need(4, "magic")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise cur.fail("magic", f"expected b'GGUF', found {magic!r}")
    cur.pos = 4
    start = cur.pos
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail("version", f"GGUF version {version} unsupported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})", start)
    start = cur.pos
    n_tensors = cur.u64("tensor_count")
    if n_tensors > limits.max_tensors:
        raise cur.fail("tensor_count", f"{n_tensors} tensors exceed the limit of {limits.max_tensors}", start)
    start = cur.pos
    n_kv = cur.u64("metadata_kv_count")
    if n_kv > limits.max_kv_pairs:
        raise cur.fail("metadata_kv_count", f"{n_kv} metadata pairs exceed the limit of {limits.max_kv_pairs}", start)

    metadata: dict[str, Any] = {}
    value_types: dict[str, ValueType] = {}
    array_types: dict[str, ValueType] = {}
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"metadata[{i}].key")
        if not key:
            raise cur.fail(f"metadata[{i}].key", "empty key", start)
        if key in metadata:
            raise cur.fail(f"metadata[{key}]", "duplicate key", start)
        vtype = cur.value_type(f"metadata[{key}]")
        if vtype is ValueType.ARRAY:
            etype, value = cur.array(f"metadata[{key}]", 1)
            array_types[key] = etype
        else:
            value = cur.value(vtype, f"metadata[{key}]")
        metadata[key] = value
        value_types[key] = vtype

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if value_types["general.alignment"] is not ValueType.UINT32 or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail("metadata[general.alignment]", f"alignment must be a power-of-two uint32, got {alignment!r}", 0)

    infos: list[tuple[str, tuple[int, ...], GGMLType, int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        start = cur.pos
        fld = f"tensor[{i}]"
        name = cur.string(f"{fld}.name", MAX_TENSOR_NAME_BYTES)
        fld = f"tensor[{i}:{name}]"
        if not name or name in names:
            raise cur.fail(f"{fld}.name", "empty tensor name" if not name else "duplicate tensor name", start)
        names.add(name)
        at = cur.pos
        n_dims = cur.u32(f"{fld}.n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"{fld}.n_dims", f"n_dims {n_dims} not in 1..{MAX_DIMS}", at)
        dims: list[int] = []
        n_elements = 1
        for d in range(n_dims):
            at = cur.pos
            dim = cur.u64(f"{fld}.dims[{d}]")
            if dim == 0:
                raise cur.fail(f"{fld}.dims[{d}]", "dimension is zero", at)
            if dim > _INT64_MAX or n_elements > _INT64_MAX // dim:
                raise cur.fail(f"{fld}.dims[{d}]", f"element count overflows int64 (dims so far {dims + [dim]})", at)
            n_elements *= dim
            dims.append(dim)
        at = cur.pos
        raw_type = cur.u32(f"{fld}.type")
        try:
            gtype = GGMLType(raw_type)
        except ValueError:
            raise cur.fail(f"{fld}.type", f"unknown ggml tensor type {raw_type}", at) from None
        layout = BLOCK_LAYOUT[gtype]
        if dims[0] % layout.block_size:
            raise cur.fail(f"{fld}.dims[0]", f"row length {dims[0]} is not a multiple of the {gtype.name} block size {layout.block_size}", at)
        n_bytes = n_elements // layout.block_size * layout.type_size
        at = cur.pos
        offset = cur.u64(f"{fld}.offset")
        if offset % alignment:
            raise cur.fail(f"{fld}.offset", f"data offset {offset} is not a multiple of the alignment {alignment}", at)
        infos.append((name, tuple(dims), gtype, offset, n_bytes))

    header_size = cur.pos
    data_offset = _align(header_size, alignment)
    tensors: list[TensorInfo] = []
    for name, dims, gtype, offset, n_bytes in infos:
        n_elements = 1
        for d in dims:
            n_elements *= d
        end = data_offset + offset + n_bytes
        if end > file_size:
            raise cur.fail(f"tensor[{name}].data", f"data [{data_offset + offset}, {end}) extends past end of file ({file_size} bytes)", data_offset + offset)
        tensors.append(TensorInfo(name, dims, gtype, offset, data_offset + offset, n_elements, n_bytes))

    prev: TensorInfo | None = None
    for t in sorted(tensors, key=lambda t: t.offset):
        if prev is not None and t.offset < prev.offset + prev.n_bytes:
            raise cur.fail(f"tensor[{t.name}].offset", f"data overlaps tensor {prev.name} (ends at relative offset {prev.offset + prev.n_bytes})", t.data_offset)
        prev = t
    if tensors and data_offset > file_size:
        raise cur.fail("data_section", f"data section starts at {data_offset}, past end of file", header_size)

    return GGUFFile(
        version=version,
        file_size=file_size,
        alignment=alignment,
        data_offset=data_offset,
        header_size=header_size,
        metadata=metadata,
        value_types=value_types,
        array_types=array_types,
        tensors=tuple(tensors),
    )


def parse_file(source: str | os.PathLike[str] | BinaryIO, limits: Limits = Limits()) -> GGUFFile:
    """Parse a GGUF file by path or open binary file object (mmap, header pages only)."""
    if isinstance(source, (str, os.PathLike)):
        with open(Path(source), "rb") as fh:
            return parse_file(fh, limits)
    fd = source.fileno()
    size = os.fstat(fd).st_size
    if size > limits.max_file_size:
        raise GGUFFormatError(f"file is {size} bytes, larger than the cap MAX_MODEL_SIZE={limits.max_file_size}", offset=0, field="file_size")
    if size == 0:
        raise GGUFFormatError("file is empty", offset=0, field="magic")
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            return parse_buffer(view, limits)
        finally:
            view.release()
