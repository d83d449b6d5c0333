"""Hand-crafted hostile GGUF files, one defect each (SPEC 4310-4312, 4224-4225).

Every refusal must be a ``GGUFFormatError`` (MODEL_LOAD_FAILED) naming the
field and the byte offset of the defect, identically whether the image is
parsed from memory or from a file (the incremental pread path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import gguf_factory as F
from gguf_factory import gstr, image, kv, kv_value, tensor_info, u32, u64
from worker_orcd.errors import ErrorCode, ModelLoadError
from worker_orcd.gguf import GGMLType, GGUFFormatError, Limits, ValueType, parse_buffer, parse_file

HEADER = 24  # magic, version, tensor_count, metadata_kv_count
ARCH = kv_value("general.architecture", ValueType.STRING, "llama")


@pytest.fixture
def refuse(tmp_path: Path):
    """Parse ``blob`` both ways; both must refuse it with the same field and offset."""

    def check(blob: bytes, field: str, offset: int, match: str = "", limits: Limits = Limits()) -> GGUFFormatError:
        with pytest.raises(GGUFFormatError) as from_buffer:
            parse_buffer(blob, limits)
        path = F.write(tmp_path / "hostile.gguf", blob)
        with pytest.raises(GGUFFormatError) as from_file:
            parse_file(path, limits)
        err = from_buffer.value
        assert isinstance(err, ModelLoadError) and err.code is ErrorCode.MODEL_LOAD_FAILED
        assert err.http_status == 422 and err.to_dict()["code"] == "MODEL_LOAD_FAILED"
        assert (err.field, err.offset) == (field, offset), f"{err.field!r} @ {err.offset}: {err.reason}"
        assert (from_file.value.field, from_file.value.offset) == (field, offset)
        assert match in err.reason, err.reason
        assert str(offset) in err.message and field in err.message
        return err

    return check


def tensors_at(*infos: bytes, kvs: tuple[bytes, ...] = (ARCH,)) -> tuple[bytes, int]:
    """Header with ``infos``; returns it and the absolute data offset (aligned to 32)."""
    head = image(list(kvs), list(infos))
    return head, -(-len(head) // 32) * 32


# --- fixed header --------------------------------------------------------------------------------


def test_worker_4312_wrong_magic(refuse) -> None:
    refuse(image([ARCH], magic=b"GGML"), "magic", 0, "not a GGUF file")


@pytest.mark.parametrize("version", [1, 4, 0, 2**32 - 1, 0x03000000])
def test_worker_4312_unsupported_version(refuse, version: int) -> None:
    """v1 (32-bit counts), v4 (future), and a big-endian v3 (reads as 0x03000000)."""
    refuse(image([ARCH], version=version), "version", 4, f"version {version} unsupported")


def test_worker_4311_tensor_count_10001(refuse) -> None:
    refuse(image([ARCH], n_tensors=10_001), "tensor_count", 8, "limit of 10000")


def test_worker_4311_tensor_count_limit_is_inclusive() -> None:
    """10,000 tensors are allowed: the count passes, parsing goes on (and fails at EOF)."""
    with pytest.raises(GGUFFormatError) as ei:
        parse_buffer(image([ARCH], n_tensors=10_000))
    assert ei.value.field == "tensor[0].name length"


def test_worker_4311_metadata_pairs_1001(refuse) -> None:
    refuse(image([ARCH], n_kv=1001), "metadata_kv_count", 16, "limit of 1000")


@pytest.mark.parametrize("count", [2**63, 2**64 - 1])
def test_worker_4311_counts_near_2_64(refuse, count: int) -> None:
    refuse(image([ARCH], n_kv=count), "metadata_kv_count", 16)
    refuse(image([ARCH], n_tensors=count), "tensor_count", 8)


def test_worker_4312_empty_file(refuse, tmp_path: Path) -> None:
    refuse(b"", "magic", 0, "file is empty")
    empty = F.write(tmp_path / "empty.gguf", b"")
    with pytest.raises(GGUFFormatError) as ei:
        parse_file(empty)
    assert ei.value.field == "magic" and "empty" in ei.value.reason


@pytest.mark.parametrize(
    ("cut", "field", "offset"),
    [(2, "magic", 0), (6, "version", 4), (10, "tensor_count", 8), (20, "metadata_kv_count", 16), (30, "metadata[0].key length", 24)],
)
def test_worker_4312_truncated_header(refuse, cut: int, field: str, offset: int) -> None:
    refuse(image([ARCH])[:cut], field, offset, "remain before end of file")


def test_worker_4225_file_larger_than_cap(refuse) -> None:
    blob = F.valid_image()
    refuse(blob, "file_size", 0, f"MAX_MODEL_SIZE={len(blob) - 1}", Limits(max_file_size=len(blob) - 1))
    assert parse_buffer(blob, Limits(max_file_size=len(blob))).file_size == len(blob)


def test_worker_4225_sparse_file_over_100_gb(tmp_path: Path) -> None:
    """A 100 GB + 1 B sparse file (no disk used) is refused by size before anything is read."""
    path = tmp_path / "huge.gguf"
    with open(path, "wb") as fh:
        fh.write(F.valid_image())
        fh.truncate(100 * 10**9 + 1)
    if os.stat(path).st_blocks * 512 > 2**20:
        pytest.skip("filesystem does not support sparse files")
    with pytest.raises(GGUFFormatError) as ei:
        parse_file(path)
    assert (ei.value.field, ei.value.offset) == ("file_size", 0)
    assert "100000000001 bytes" in ei.value.reason
    # MAX_MODEL_SIZE is configurable: raised, the same file parses (its header is valid).
    assert parse_file(path, Limits(max_file_size=200 * 10**9)).file_size == 100 * 10**9 + 1


# --- strings ---------------------------------------------------------------------------------------


def test_worker_4311_string_length_2_pow_40(refuse) -> None:
    key = gstr("general.name")
    blob = image([kv("general.name", ValueType.STRING, gstr(b"abc", length=2**40))])
    refuse(blob, "metadata[general.name]", HEADER + len(key) + 4, f"string length {2**40} exceeds the limit of 65536")


def test_worker_4311_key_length_2_pow_64_minus_1(refuse) -> None:
    refuse(image([gstr(b"k", length=2**64 - 1) + u32(ValueType.UINT8) + b"\0"]), "metadata[0].key", HEADER, "exceeds the limit")


def test_worker_4311_string_of_64_kib_allowed_one_more_refused(refuse) -> None:
    ok = image([kv_value("general.name", ValueType.STRING, "x" * 65536)])
    assert len(parse_buffer(ok).metadata["general.name"]) == 65536
    refuse(image([kv_value("general.name", ValueType.STRING, "x" * 65537)]), "metadata[general.name]", HEADER + len(gstr("general.name")) + 4)


def test_worker_4312_string_past_eof(refuse) -> None:
    blob = image([kv("general.name", ValueType.STRING, gstr(b"abc", length=10))])
    refuse(blob, "metadata[general.name]", HEADER + len(gstr("general.name")) + 4 + 8, "needs 10 bytes but only 3 remain")


@pytest.mark.parametrize(
    ("where", "raw"),
    [("value", b"ab\xffcd"), ("value", b"\xed\xa0\x80"), ("value", b"\xc3"), ("key", b"gen\xc0\xafx")],
)
def test_worker_4312_invalid_utf8(refuse, where: str, raw: bytes) -> None:
    """Bad bytes, a UTF-16 surrogate, a truncated sequence, an overlong '/'; offset is the bad byte."""
    if where == "key":
        bad = raw.index(0xC0)
        refuse(image([kv(raw, ValueType.UINT8, b"\0")]), "metadata[0].key", HEADER + 8 + bad, "not valid UTF-8")
        return
    blob = image([kv("general.name", ValueType.STRING, gstr(raw))])
    at = HEADER + len(gstr("general.name")) + 4 + 8
    bad = next(i for i, b in enumerate(raw) if b >= 0x80 and (b == 0xFF or i == 0 or raw[i - 1] < 0x80))
    refuse(blob, "metadata[general.name]", at + bad, "not valid UTF-8")


def test_worker_4312_invalid_utf8_in_string_array(refuse) -> None:
    items = gstr("ok") + gstr(b"\x80") + gstr("never read")
    body = u32(ValueType.STRING) + u64(3) + items
    blob = image([kv("tokenizer.ggml.tokens", ValueType.ARRAY, body)])
    at = HEADER + len(gstr("tokenizer.ggml.tokens")) + 4 + 12 + len(gstr("ok")) + 8
    refuse(blob, "metadata[tokenizer.ggml.tokens][1]", at, "not valid UTF-8")


def test_worker_4312_invalid_utf8_tensor_name(refuse) -> None:
    head, _ = tensors_at(tensor_info(b"w\xfe", [8], GGMLType.F32, 0))
    refuse(head + bytes(64), "tensor[0].name", len(image([ARCH])) + 8 + 1, "not valid UTF-8")


def test_worker_4312_key_is_sanitised_in_error_field(refuse) -> None:
    """A hostile key cannot inject newlines or 64 KiB into the error field (and the logs)."""
    key = "evil\nkey" + "x" * 1000
    pair = kv_value(key, ValueType.UINT8, 1)
    err = refuse(image([pair, pair]), "metadata[" + repr(key[:64])[1:-1] + "...]", HEADER + len(pair))
    assert "\n" not in err.field and len(err.field) < 100


# --- metadata values --------------------------------------------------------------------------------


def test_worker_4312_duplicate_key(refuse) -> None:
    pair = kv_value("llama.block_count", ValueType.UINT32, 1)
    refuse(image([ARCH, pair, pair]), "metadata[llama.block_count]", HEADER + len(ARCH) + len(pair), "duplicate key")


def test_worker_4312_empty_key(refuse) -> None:
    refuse(image([ARCH, kv("", ValueType.UINT8, b"\0")]), "metadata[1].key", HEADER + len(ARCH), "empty key")


@pytest.mark.parametrize("byte", [2, 0xFF])
def test_worker_4312_bad_bool_byte(refuse, byte: int) -> None:
    blob = image([kv("t.flag", ValueType.BOOL, bytes([byte]))])
    refuse(blob, "metadata[t.flag]", HEADER + len(gstr("t.flag")) + 4, f"got {byte}")


def test_worker_4312_bad_bool_byte_in_array(refuse) -> None:
    blob = image([kv("t.flags", ValueType.ARRAY, u32(ValueType.BOOL) + u64(4) + b"\x01\x00\x07\x01")])
    refuse(blob, "metadata[t.flags][2]", HEADER + len(gstr("t.flags")) + 4 + 12 + 2, "got 7")


@pytest.mark.parametrize("raw", [13, 255, 2**32 - 1])
def test_worker_4312_unknown_value_type(refuse, raw: int) -> None:
    refuse(image([ARCH, kv("t.x", raw, b"\0" * 8)]), "metadata[t.x]", HEADER + len(ARCH) + len(gstr("t.x")), f"unknown metadata value type {raw}")


def test_worker_4312_unknown_array_element_type(refuse) -> None:
    blob = image([kv("t.arr", ValueType.ARRAY, u32(42) + u64(0))])
    refuse(blob, "metadata[t.arr] element", HEADER + len(gstr("t.arr")) + 4, "unknown metadata value type 42")


def test_worker_4312_nested_array_depth_over_limit(refuse) -> None:
    def nest(depth: int) -> bytes:  # depth 1 = a flat array of one uint8
        return u32(ValueType.UINT8) + u64(1) + b"\x05" if depth == 1 else u32(ValueType.ARRAY) + u64(1) + nest(depth - 1)

    key_at = HEADER + len(gstr("t.deep")) + 4
    ok = image([kv("t.deep", ValueType.ARRAY, nest(4))])
    assert parse_buffer(ok).metadata["t.deep"] == [[[[5]]]]
    refuse(image([kv("t.deep", ValueType.ARRAY, nest(5))]), "metadata[t.deep][0][0][0][0]", key_at + 4 * 12, "nested deeper than 4")
    refuse(image([kv("t.deep", ValueType.ARRAY, nest(2))]), "metadata[t.deep][0]", key_at + 12, "nested deeper than 1", Limits(max_array_nesting=1))


def test_worker_4311_array_length_over_limit(refuse) -> None:
    n = (1 << 22) + 1
    blob = image([kv("t.arr", ValueType.ARRAY, u32(ValueType.UINT8) + u64(n))])
    refuse(blob, "metadata[t.arr]", HEADER + len(gstr("t.arr")) + 4 + 4, f"array length {n} exceeds the limit of {1 << 22}")


@pytest.mark.parametrize("etype", [ValueType.UINT32, ValueType.STRING, ValueType.ARRAY, ValueType.FLOAT64])
def test_worker_4312_array_length_cannot_fit_in_file(refuse, etype: ValueType) -> None:
    """1M elements declared in a tiny file: refused before any per-element work or allocation."""
    blob = image([kv("t.arr", ValueType.ARRAY, u32(etype) + u64(1_000_000) + bytes(8))])
    refuse(blob, "metadata[t.arr]", HEADER + len(gstr("t.arr")) + 4 + 4, "cannot fit in the 8 bytes left")


def test_worker_4312_array_strings_lie_about_length(refuse) -> None:
    body = u32(ValueType.STRING) + u64(2) + gstr("a") + gstr(b"bc", length=2**62)
    blob = image([kv("t.arr", ValueType.ARRAY, body)])
    refuse(blob, "metadata[t.arr][1]", HEADER + len(gstr("t.arr")) + 4 + 12 + len(gstr("a")), "exceeds the limit")


@pytest.mark.parametrize(
    ("vtype", "body", "shown"),
    [
        (ValueType.UINT32, u32(48), "48"),
        (ValueType.UINT32, u32(0), "0"),
        (ValueType.UINT32, u32(2**32 - 1), str(2**32 - 1)),
        (ValueType.UINT64, u64(32), "UINT64"),
        (ValueType.INT32, u32(32), "INT32"),
        (ValueType.STRING, gstr("32"), "STRING"),
    ],
)
def test_worker_4312_bad_general_alignment(refuse, vtype: ValueType, body: bytes, shown: str) -> None:
    blob = image([ARCH, kv("general.alignment", vtype, body)])
    refuse(blob, "metadata[general.alignment]", HEADER + len(ARCH) + len(gstr("general.alignment")), f"got {shown}")


# --- tensor infos ------------------------------------------------------------------------------------


def _info_at() -> int:
    return len(image([ARCH]))


def test_worker_4312_dims_product_overflows_64_bits(refuse) -> None:
    info = tensor_info("w", [2**32, 2**32], GGMLType.F32, 0)
    dim1 = _info_at() + len(gstr("w")) + 4 + 8
    refuse(image([ARCH], [info]), "tensor[0:w].dims[1]", dim1, "overflows int64")


def test_worker_4312_single_dim_above_int64(refuse) -> None:
    info = tensor_info("w", [2**63], GGMLType.F32, 0)
    refuse(image([ARCH], [info]), "tensor[0:w].dims[0]", _info_at() + len(gstr("w")) + 4, "overflows int64")


def test_worker_4312_byte_count_overflow_is_past_eof(refuse) -> None:
    """ne fits in int64 but ne * 4 bytes does not: Python ints never wrap, it is simply past EOF."""
    head, data_at = tensors_at(tensor_info("w", [2**62], GGMLType.F32, 0))
    refuse(head + bytes(32), "tensor[w].data", data_at, "extends past end of file")


def test_worker_4312_zero_dim(refuse) -> None:
    info = tensor_info("w", [8, 0], GGMLType.F32, 0)
    refuse(image([ARCH], [info]), "tensor[0:w].dims[1]", _info_at() + len(gstr("w")) + 4 + 8, "dimension is zero")


@pytest.mark.parametrize("n_dims", [0, 5, 2**32 - 1])
def test_worker_4312_bad_n_dims(refuse, n_dims: int) -> None:
    info = tensor_info("w", [8] * min(n_dims, 5), GGMLType.F32, 0, n_dims=n_dims)
    refuse(image([ARCH], [info]), "tensor[0:w].n_dims", _info_at() + len(gstr("w")), f"n_dims {n_dims} not in 1..4")


@pytest.mark.parametrize("raw", [4, 5, 31, 99, 2**32 - 1])
def test_worker_4312_unknown_dtype(refuse, raw: int) -> None:
    """Includes 4/5 (Q4_2/Q4_3, removed from ggml) and 31 (a gap in the enum)."""
    info = tensor_info("w", [32], raw, 0)
    refuse(image([ARCH], [info]), "tensor[0:w].type", _info_at() + len(gstr("w")) + 4 + 8, f"unknown ggml tensor type {raw}")


def test_worker_4312_row_not_multiple_of_block(refuse) -> None:
    info = tensor_info("w", [48, 2], GGMLType.Q4_K, 0)
    refuse(image([ARCH], [info]), "tensor[0:w].dims[0]", _info_at() + len(gstr("w")) + 4, "block size 256")


def test_worker_4312_tensor_data_past_eof(refuse) -> None:
    head, data_at = tensors_at(tensor_info("a", [8], GGMLType.F32, 0), tensor_info("b", [8], GGMLType.F32, 32))
    full = head + bytes(data_at - len(head)) + bytes(64)
    assert parse_buffer(full).tensors[1].data_offset == data_at + 32
    refuse(full[:-1], "tensor[b].data", data_at + 32, f"[{data_at + 32}, {data_at + 64}) extends past end of file")


def test_worker_4312_tensor_offset_past_eof(refuse) -> None:
    """An offset far beyond the file: the error points at the end of the file, not at 2**63."""
    head, data_at = tensors_at(tensor_info("a", [8], GGMLType.F32, 2**63))
    blob = head + bytes(data_at - len(head)) + bytes(64)
    refuse(blob, "tensor[a].data", len(blob), f"[{data_at + 2**63}, ")


def test_worker_4312_data_section_past_eof(refuse) -> None:
    """The header ends mid-padding: no tensor data at all."""
    head, _ = tensors_at(tensor_info("a", [8], GGMLType.F32, 0))
    refuse(head, "tensor[a].data", len(head), "extends past end of file")


def test_worker_4312_overlapping_tensors(refuse) -> None:
    head, data_at = tensors_at(tensor_info("a", [16], GGMLType.F32, 0), tensor_info("b", [16], GGMLType.F32, 32))
    refuse(head + bytes(data_at - len(head)) + bytes(128), "tensor[b].offset", data_at + 32, "overlaps tensor a")


def test_worker_4312_overlap_found_regardless_of_header_order(refuse) -> None:
    head, data_at = tensors_at(
        tensor_info("late", [8], GGMLType.F32, 256), tensor_info("a", [128], GGMLType.F32, 0), tensor_info("b", [8], GGMLType.F32, 480)
    )
    refuse(head + bytes(data_at - len(head)) + bytes(512), "tensor[late].offset", data_at + 256, "overlaps tensor a")


def test_worker_4312_same_offset_twice(refuse) -> None:
    head, data_at = tensors_at(tensor_info("a", [8], GGMLType.F32, 0), tensor_info("b", [8], GGMLType.F32, 0))
    err = refuse(head + bytes(data_at - len(head)) + bytes(32), "tensor[b].offset", data_at, "overlaps")
    assert "tensor a" in err.reason


@pytest.mark.parametrize("offset", [4, 33, 2**63 + 1])
def test_worker_4312_misaligned_offset(refuse, offset: int) -> None:
    info = tensor_info("w", [8], GGMLType.F32, offset)
    refuse(image([ARCH], [info]), "tensor[0:w].offset", _info_at() + len(gstr("w")) + 4 + 8 + 4, "not a multiple of the alignment 32")


def test_worker_4312_alignment_from_metadata_applies() -> None:
    """With general.alignment=64 an offset of 32 is misaligned and the data section moves."""
    align = kv_value("general.alignment", ValueType.UINT32, 64)
    with pytest.raises(GGUFFormatError, match="alignment 64"):
        parse_buffer(image([align], [tensor_info("w", [8], GGMLType.F32, 32)]))
    head = image([align], [tensor_info("w", [8], GGMLType.F32, 64)])
    blob = head + bytes(-len(head) % 64) + bytes(96)
    g = parse_buffer(blob)
    assert g.alignment == 64 and g.data_offset % 64 == 0 and g.tensors[0].data_offset == g.data_offset + 64


def test_worker_4312_duplicate_tensor_name(refuse) -> None:
    first = tensor_info("w", [8], GGMLType.F32, 0)
    refuse(image([ARCH], [first, tensor_info("w", [8], GGMLType.F32, 32)]), "tensor[1:w].name", _info_at() + len(first), "duplicate tensor name")


def test_worker_4312_empty_tensor_name(refuse) -> None:
    refuse(image([ARCH], [tensor_info("", [8], GGMLType.F32, 0)]), "tensor[0:].name", _info_at(), "empty tensor name")


def test_worker_4312_tensor_name_over_256_bytes(refuse) -> None:
    refuse(image([ARCH], [tensor_info("n" * 257, [8], GGMLType.F32, 0)]), "tensor[0].name", _info_at(), "limit of 256 bytes")
