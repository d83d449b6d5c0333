"""Defensive GGUF v2/v3 header reader (SPEC 4310-4312, 4224-4225).

Hand-written because no library parses untrusted GGUF safely: gguf-py maps the
whole file with numpy views and trusts every length field. Here every read is
bounds-checked against the file size, every count against a limit before any
allocation, and every failure is one ``GGUFFormatError`` naming the byte
offset and the field. Only the header is read, with ``pread`` into a growing
buffer rather than through mmap: parsing cost does not grow with tensor bytes,
and a file truncated under us is a typed error instead of a SIGBUS.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
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
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_FIRST_READ = 1 << 20  # one read covers the header of most small models
_LABEL_CHARS = 64

Buffer = bytes | bytearray | memoryview
ReadAt = Callable[[int, int], bytes]  # (offset, n) -> up to n bytes


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
    # SHA-256 of the header_size bytes parsed: a later pass over the file (the one-pass upload) checks
    # that the bytes it hashes are the ones this layout came from
    header_sha256: str | None = None
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


def _label(text: str) -> str:
    """A key or tensor name made safe for error fields and logs (short, printable)."""
    if len(text) <= _LABEL_CHARS and text.isprintable():
        return text
    return repr(text[:_LABEL_CHARS])[1:-1] + ("..." if len(text) > _LABEL_CHARS else "")


class _Cursor:
    """Bounds-checked little-endian reads over the file's first bytes.

    ``buf`` holds bytes ``[0, avail)`` of a file of ``end`` bytes; ``need``
    refuses reads past the end of file or past ``max_header_bytes`` and, when
    a ``read_at`` is given, loads more of the file on demand.
    """

    def __init__(self, buf: Buffer, size: int, limits: Limits, read_at: ReadAt | None = None) -> None:
        self.buf = buf
        self.end = size
        self.limits = limits
        self.read_at = read_at
        self.avail = min(len(buf), size, limits.max_header_bytes)
        self.pos = 0
        self.elements = 0  # array elements decoded so far (Limits.max_metadata_elements)

    def fail(self, field: str, reason: str, offset: int | None = None) -> GGUFFormatError:
        return GGUFFormatError(reason, offset=self.pos if offset is None else offset, field=field)

    def need(self, n: int, field: str) -> None:
        if self.pos + n > self.avail:
            self._load(self.pos + n, field)

    def _load(self, stop: int, field: str) -> None:
        if stop > self.end:
            raise self.fail(field, f"needs {stop - self.pos} bytes but only {self.end - self.pos} remain before end of file")
        cap = self.limits.max_header_bytes
        if stop > cap:
            raise self.fail(field, f"header extends past {cap} bytes (limit max_header_bytes)")
        if self.read_at is None or not isinstance(self.buf, bytearray):
            raise AssertionError("a fully buffered image cannot need more bytes")
        want = min(self.end, cap, max(stop, 2 * self.avail, _FIRST_READ)) - self.avail
        try:
            chunk = self.read_at(self.avail, want)
        except (OSError, ValueError) as exc:  # ValueError: a closed file object
            raise self.fail("read", f"reading the file failed: {exc}", self.avail) from None
        if len(chunk) != want:
            raise self.fail("file_size", f"file shrank while being read (got {len(chunk)} of {want} bytes)", self.avail + len(chunk))
        self.buf += chunk
        self.avail += want

    def scalar(self, vtype: ValueType, field: str) -> Any:
        fmt, size = SCALAR_FORMATS[vtype]
        self.need(size, field)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        if vtype is ValueType.BOOL:
            if value > 1:
                raise self.fail(field, f"bool byte must be 0 or 1, got {value}")
            value = value == 1
        self.pos += size
        return value

    def u32(self, field: str) -> int:
        self.need(4, field)
        (value,) = _U32(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, field: str) -> int:
        self.need(8, field)
        (value,) = _U64(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, field: str, max_bytes: int | None = None) -> str:
        start = self.pos
        length = self.u64(f"{field} length")
        cap = self.limits.max_string_bytes if max_bytes is None else max_bytes
        if length > cap:
            raise self.fail(field, f"string length {length} exceeds the limit of {cap} bytes", start)
        self.need(length, field)
        try:
            text = str(self.buf[self.pos : self.pos + length], "utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(field, f"string is not valid UTF-8 ({exc.reason})", self.pos + exc.start) from None
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
        if self.pos + count * _MIN_ELEMENT_BYTES[etype] > self.end:
            raise self.fail(field, f"array of {count} {etype.name} elements cannot fit in the {self.end - self.pos} bytes left", start)
        self.elements += count
        if self.elements > self.limits.max_metadata_elements:
            raise self.fail(field, f"metadata arrays hold more than {self.limits.max_metadata_elements} elements in all", start)
        if etype is ValueType.STRING:
            return etype, self._strings(field, count)
        if etype is ValueType.BOOL:
            return etype, self._bools(field, count)
        if etype is ValueType.ARRAY:
            return etype, [self.array(f"{field}[{i}]", depth + 1)[1] for i in range(count)]
        fmt, size = SCALAR_FORMATS[etype]
        self.need(count * size, field)
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
        self.pos += count * size
        return etype, values

    def _bools(self, field: str, count: int) -> list[bool]:
        self.need(count, field)
        raw = bytes(self.buf[self.pos : self.pos + count])
        if raw.translate(None, b"\x00\x01"):
            i = next(i for i, b in enumerate(raw) if b > 1)
            raise self.fail(f"{field}[{i}]", f"bool byte must be 0 or 1, got {raw[i]}", self.pos + i)
        self.pos += count
        return [b == 1 for b in raw]

    def _strings(self, field: str, count: int) -> list[str]:
        """Hot loop for tokenizer arrays (~150k strings): same checks as ``string``, inlined."""
        buf, p, avail, cap = self.buf, self.pos, self.avail, self.limits.max_string_bytes
        out: list[str] = []
        append = out.append
        i = q = 0
        try:
            for i in range(count):
                q = p + 8
                if q > avail:
                    self.pos = p
                    self.need(8, f"{field}[{i}] length")
                    buf, avail = self.buf, self.avail
                (n,) = _U64(buf, p)
                if n > cap:
                    raise self.fail(f"{field}[{i}]", f"string length {n} exceeds the limit of {cap} bytes", p)
                r = q + n
                if r > avail:
                    self.pos = q
                    self.need(n, f"{field}[{i}]")
                    buf, avail = self.buf, self.avail
                append(str(buf[q:r], "utf-8"))
                p = r
        except UnicodeDecodeError as exc:
            raise self.fail(f"{field}[{i}]", f"string is not valid UTF-8 ({exc.reason})", q + exc.start) from None
        self.pos = p
        return out


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _parse(cur: _Cursor) -> GGUFFile:
    limits = cur.limits
    file_size = cur.end
    if file_size > limits.max_file_size:
        raise cur.fail("file_size", f"file is {file_size} bytes, larger than the cap MAX_MODEL_SIZE={limits.max_file_size}", 0)
    if file_size == 0:
        raise cur.fail("magic", "file is empty", 0)
    cur.need(4, "magic")
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        err = cur.fail("magic", "not a GGUF file (bad magic number)")
        err.detail = f"expected b'GGUF', found {magic!r}"  # the file's bytes: the operator's log only
        raise err
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail("version", f"GGUF version {version} unsupported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})", 4)
    n_tensors = cur.u64("tensor_count")
    if n_tensors > limits.max_tensors:
        raise cur.fail("tensor_count", f"{n_tensors} tensors exceed the limit of {limits.max_tensors}", 8)
    n_kv = cur.u64("metadata_kv_count")
    if n_kv > limits.max_kv_pairs:
        raise cur.fail("metadata_kv_count", f"{n_kv} metadata pairs exceed the limit of {limits.max_kv_pairs}", 16)

    metadata: dict[str, Any] = {}
    value_types: dict[str, ValueType] = {}
    array_types: dict[str, ValueType] = {}
    value_at: dict[str, int] = {}
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"metadata[{i}].key")
        fld = f"metadata[{_label(key)}]"
        if not key:
            raise cur.fail(f"metadata[{i}].key", "empty key", start)
        if key in metadata:
            raise cur.fail(fld, "duplicate key", start)
        value_at[key] = cur.pos
        vtype = cur.value_type(fld)
        if vtype is ValueType.ARRAY:
            etype, value = cur.array(fld, 1)
            array_types[key] = etype
        else:
            value = cur.value(vtype, fld)
        metadata[key] = value
        value_types[key] = vtype

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if value_types["general.alignment"] is not ValueType.UINT32 or alignment == 0 or alignment & (alignment - 1):
            shown = value_types["general.alignment"].name if value_types["general.alignment"] is not ValueType.UINT32 else alignment
            raise cur.fail("metadata[general.alignment]", f"alignment must be a power-of-two uint32, got {shown}", value_at["general.alignment"])

    infos: list[tuple[str, tuple[int, ...], GGMLType, int, int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        start = cur.pos
        name = cur.string(f"tensor[{i}].name", MAX_TENSOR_NAME_BYTES)
        fld = f"tensor[{i}:{_label(name)}]"
        if not name or name in names:
            raise cur.fail(f"{fld}.name", "empty tensor name" if not name else "duplicate tensor name", start)
        names.add(name)
        at = cur.pos
        n_dims = cur.u32(f"{fld}.n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"{fld}.n_dims", f"n_dims {n_dims} not in 1..{MAX_DIMS}", at)
        dims_at = cur.pos
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
            raise cur.fail(f"{fld}.dims[0]", f"row length {dims[0]} is not a multiple of the {gtype.name} block size {layout.block_size}", dims_at)
        n_bytes = n_elements // layout.block_size * layout.type_size
        at = cur.pos
        offset = cur.u64(f"{fld}.offset")
        if offset % alignment:
            raise cur.fail(f"{fld}.offset", f"data offset {offset} is not a multiple of the alignment {alignment}", at)
        infos.append((name, tuple(dims), gtype, offset, n_elements, n_bytes))

    header_size = cur.pos
    data_offset = _align(header_size, alignment)
    tensors: list[TensorInfo] = []
    for name, dims_t, gtype, offset, n_elements, n_bytes in infos:
        start, end = data_offset + offset, data_offset + offset + n_bytes
        if end > file_size:
            raise cur.fail(f"tensor[{_label(name)}].data", f"data [{start}, {end}) extends past end of file ({file_size} bytes)", min(start, file_size))
        tensors.append(TensorInfo(name, dims_t, gtype, offset, start, n_elements, n_bytes))

    prev: TensorInfo | None = None
    for t in sorted(tensors, key=lambda t: t.offset):
        if prev is not None and t.offset < prev.offset + prev.n_bytes:
            raise cur.fail(
                f"tensor[{_label(t.name)}].offset",
                f"data overlaps tensor {_label(prev.name)} (which ends at relative offset {prev.offset + prev.n_bytes})",
                t.data_offset,
            )
        prev = t

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
        header_sha256=hashlib.sha256(memoryview(cur.buf)[:header_size]).hexdigest(),
    )


def parse_buffer(buf: Buffer, limits: Limits = Limits()) -> GGUFFile:
    """Parse a GGUF image held in ``buf`` (the whole file, or an mmap of it)."""
    return _parse(_Cursor(buf, len(buf), limits))


def _path_error(reason: str) -> GGUFFormatError:
    return GGUFFormatError(reason, offset=0, field="path")


def _pread_exact(fd: int) -> ReadAt:
    def read_at(offset: int, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            chunk = os.pread(fd, n, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            n -= len(chunk)
        return b"".join(parts)

    return read_at


def _parse_fd(fd: int, limits: Limits) -> GGUFFile:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise _path_error(f"cannot stat the model file: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _path_error("not a regular file (a directory, device, socket or pipe)")
    return _parse(_Cursor(bytearray(), st.st_size, limits, _pread_exact(fd)))


def _parse_stream(fh: BinaryIO, limits: Limits) -> GGUFFile:
    """File objects without a descriptor (``io.BytesIO``, wrappers): seek + read."""
    if not (hasattr(fh, "seek") and hasattr(fh, "read")):
        raise _path_error(f"model source must be a path or a binary file object, not {type(fh).__name__}")
    try:
        size = fh.seek(0, io.SEEK_END)
    except (OSError, ValueError) as exc:
        raise _path_error(f"model source is not a seekable file: {exc}") from None

    def read_at(offset: int, n: int) -> bytes:
        fh.seek(offset)
        parts: list[bytes] = []
        while n > 0:
            chunk = fh.read(n)
            if not chunk:
                break
            if not isinstance(chunk, bytes):
                raise ValueError(f"the file object returned {type(chunk).__name__}, not bytes (opened in text mode?)")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    return _parse(_Cursor(bytearray(), size, limits, read_at))


def parse_file(source: str | os.PathLike[str] | BinaryIO, limits: Limits = Limits()) -> GGUFFile:
    """Parse a GGUF file by path or open binary file object, reading only its header.

    Any failure, a missing file or a directory included, is a ``GGUFFormatError``.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            # O_NONBLOCK: opening a FIFO must not hang; fstat below refuses it.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, ValueError) as exc:  # ValueError: NUL in the path
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise _path_error(f"cannot open model file {path!r}: {reason}") from None
        try:
            return _parse_fd(fd, limits)
        finally:
            os.close(fd)
    try:
        fd = source.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both OSError and ValueError
        return _parse_stream(source, limits)
    return _parse_fd(fd, limits)
