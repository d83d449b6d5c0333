"""The GGUF reader against real models and gguf-py, its I/O paths and its limits (SPEC 4310-4312, 4224-4225).

gguf-py (llama.cpp's reference reader) is trusted here only as a second
opinion on well-formed files: every key, value type, value, tensor name,
shape, type, absolute offset and size must agree exactly.
"""

from __future__ import annotations

import io
import mmap
import os
from pathlib import Path

import gguf
import pytest

import gguf_factory as F
from worker_orcd.errors import ErrorCode, ModelLoadError
from worker_orcd.gguf import BLOCK_LAYOUT, GGMLType, GGUFFormatError, Limits, ValueType, parse_buffer, parse_file

# gguf-py needs ~7 s per Qwen model and ~10 s for gemma3's 262k-token vocabulary.
REAL_MODELS = ["qwen05_path", "qwen15_path", pytest.param("gemma_path", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=REAL_MODELS)
def real_pair(request: pytest.FixtureRequest) -> tuple[Path, object, F.ReferenceView]:
    path = request.getfixturevalue(request.param)
    return path, parse_file(path), F.reference_view(path)


def test_worker_4312_real_model_metadata_matches_gguf_py(real_pair: tuple) -> None:
    """Every KV pair: key order, stored type, array element type, value (arrays element-wise)."""
    _, ours, ref = real_pair
    assert len(ours.metadata) == len(ref.metadata)
    F.assert_agrees_with_reference(ours, ref)


def test_worker_4312_real_model_tensors_match_gguf_py(real_pair: tuple) -> None:
    path, ours, ref = real_pair
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(ours.tensors, ref.tensors):
        assert (t.shape, int(t.ggml_type), t.data_offset, t.n_bytes, t.n_elements) == (
            r.shape, r.ggml_type, r.data_offset, r.n_bytes, r.n_elements
        ), t.name
        assert t.data_offset == ours.data_offset + t.offset
    last = max(t.data_offset + t.n_bytes for t in ours.tensors)
    assert last <= ours.file_size == path.stat().st_size
    assert ours.tensor_bytes == sum(r.n_bytes for r in ref.tensors)


def test_worker_4312_real_model_same_through_buffer_and_stream(qwen05_path: Path) -> None:
    """mmap'd buffer, fd (pread) and descriptor-less stream paths build the same GGUFFile."""
    by_path = parse_file(qwen05_path)
    with open(qwen05_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            by_buffer = parse_buffer(view)
        finally:
            view.release()
    stream = _CountingStream(qwen05_path)  # no fileno(): the seek + read path
    try:
        by_stream = parse_file(stream)  # type: ignore[arg-type]
    finally:
        stream.close()
    assert by_path == by_buffer == by_stream
    assert by_path.architecture == "qwen2"
    assert by_path.arch_value("block_count") == 24
    assert len(by_path.metadata["tokenizer.ggml.tokens"]) == 151936


# --- I/O paths ------------------------------------------------------------------------------


def test_worker_4312_file_fd_stream_and_buffer_agree(tmp_path: Path) -> None:
    blob = F.valid_image()
    path = F.write(tmp_path / "m.gguf", blob)
    expected = parse_buffer(blob)
    with open(path, "rb") as fh:
        by_fh = parse_file(fh)
    assert parse_file(path) == parse_file(str(path)) == by_fh == parse_file(io.BytesIO(blob)) == expected
    assert expected.tensor("b.weight").n_bytes == 68
    assert expected.has_tensor("a.weight") and not expected.has_tensor("c")
    assert expected.header_size <= expected.data_offset == 288


class _CountingStream(io.RawIOBase):
    """A descriptor-less source that records how many bytes the reader asked for."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "rb")
        self.bytes_read = 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.fh.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        self.fh.close()


def test_worker_4310_only_the_header_is_read(tmp_path: Path) -> None:
    """A 1 GB (sparse) tensor region is never read: the reader stops at its first 1 MiB."""
    n = 256 * 2**20  # F32 elements: 1 GiB of data
    blob = F.image([F.kv_value("general.architecture", ValueType.STRING, "llama")], [F.tensor_info("w", [n], GGMLType.F32, 0)])
    path = tmp_path / "big.gguf"
    with open(path, "wb") as fh:
        fh.write(blob)
        fh.truncate(-(-len(blob) // 32) * 32 + 4 * n)
    stream = _CountingStream(path)
    try:
        g = parse_file(stream)  # type: ignore[arg-type]
    finally:
        stream.close()
    assert g.tensors[0].n_bytes == 4 * n
    assert stream.bytes_read <= 2**20


def test_worker_4312_file_shrinking_while_read_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncation under the reader gives GGUFFormatError, not SIGBUS (no mmap) or a short-read crash."""
    tokens = [f"tok{i:06d}" + "x" * 40 for i in range(40_000)]  # ~2.2 MB header: several reads
    blob = F.image([F.kv_value("tokenizer.ggml.tokens", ValueType.ARRAY, tokens, ValueType.STRING)])
    path = F.write(tmp_path / "shrinks.gguf", blob)
    real_pread = os.pread
    calls = 0

    def pread_then_truncate(fd: int, n: int, offset: int) -> bytes:
        nonlocal calls
        calls += 1
        data = real_pread(fd, n, offset)
        if calls == 1:
            os.truncate(path, 2**20 + 10)
        return data

    monkeypatch.setattr(os, "pread", pread_then_truncate)
    with pytest.raises(GGUFFormatError) as ei:
        parse_file(path)
    assert ei.value.field == "file_size" and "shrank" in ei.value.reason
    assert ei.value.offset == 2**20 + 10


def test_worker_4312_read_error_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = F.write(tmp_path / "m.gguf", F.valid_image())

    def failing_pread(fd: int, n: int, offset: int) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pread", failing_pread)
    with pytest.raises(GGUFFormatError) as ei:
        parse_file(path)
    assert ei.value.field == "read" and ei.value.offset == 0


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "nul"])
def test_worker_4340_unusable_path_is_model_load_failed(tmp_path: Path, kind: str) -> None:
    """Not a raw OSError/IsADirectoryError; a FIFO must not block the worker."""
    target: str | Path
    if kind == "missing":
        target = tmp_path / "absent.gguf"
    elif kind == "directory":
        target = tmp_path
    elif kind == "fifo":
        target = tmp_path / "pipe.gguf"
        os.mkfifo(target)
    else:
        target = str(tmp_path) + "/a\0b.gguf"
    with pytest.raises(GGUFFormatError) as ei:
        parse_file(target)
    assert isinstance(ei.value, ModelLoadError) and ei.value.code is ErrorCode.MODEL_LOAD_FAILED
    assert ei.value.field == "path" and ei.value.offset == 0


def test_worker_4340_unreadable_file_is_model_load_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = F.write(tmp_path / "m.gguf", F.valid_image())
    path.chmod(0)
    if os.geteuid() == 0:  # root opens a mode-000 file anyway: make open() fail as it would for others
        def refuse(*args: object, **kwargs: object) -> int:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(GGUFFormatError) as ei:
        parse_file(path)
    assert ei.value.field == "path" and "Permission denied" in ei.value.reason


def test_worker_4312_unseekable_stream_is_model_load_failed() -> None:
    class Pipe(io.RawIOBase):
        def readable(self) -> bool:
            return True

    with pytest.raises(GGUFFormatError) as ei:
        parse_file(Pipe())  # type: ignore[arg-type]
    assert ei.value.field == "path"


# --- limits -----------------------------------------------------------------------------------


def test_worker_4311_limits_cannot_be_disabled() -> None:
    for bad in ({"max_tensors": -1}, {"max_file_size": None}, {"max_string_bytes": 1.5}, {"max_array_nesting": 10_000}, {"max_kv_pairs": True}):
        with pytest.raises(ValueError):
            Limits(**bad)  # type: ignore[arg-type]
    assert Limits(max_file_size=200 * 10**9).max_file_size == 200 * 10**9  # MAX_MODEL_SIZE is configurable upward


def test_worker_4311_header_bytes_capped(tmp_path: Path) -> None:
    blob = F.valid_image()
    path = F.write(tmp_path / "m.gguf", blob)
    for parse in (lambda lim: parse_buffer(blob, lim), lambda lim: parse_file(path, lim)):
        with pytest.raises(GGUFFormatError) as ei:
            parse(Limits(max_header_bytes=100))
        assert "max_header_bytes" in ei.value.reason and ei.value.offset < 100


def test_worker_4311_total_array_elements_capped() -> None:
    kvs = [F.kv_value(f"k{i}", ValueType.ARRAY, [i % 256 for i in range(600)], ValueType.UINT8) for i in range(2)]
    blob = F.image(kvs)
    assert len(parse_buffer(blob, Limits(max_metadata_elements=1200)).metadata["k1"]) == 600
    with pytest.raises(GGUFFormatError) as ei:
        parse_buffer(blob, Limits(max_metadata_elements=1199))
    assert ei.value.field == "metadata[k1]" and "1199" in ei.value.reason


# --- constants agree with gguf-py ---------------------------------------------------------------


def test_worker_4312_ggml_types_and_block_layout_match_gguf_py() -> None:
    assert set(BLOCK_LAYOUT) == set(GGMLType)
    for t in GGMLType:
        ref = gguf.GGMLQuantizationType[t.name]
        assert int(ref) == int(t), t.name
        assert (BLOCK_LAYOUT[t].block_size, BLOCK_LAYOUT[t].type_size) == gguf.GGML_QUANT_SIZES[ref], t.name


def test_worker_4312_value_types_match_gguf_py() -> None:
    assert {v.name: int(v) for v in ValueType} == {v.name: int(v) for v in gguf.GGUFValueType}


@pytest.mark.parametrize("source", [b"/not/a/str/path", 42, io.StringIO("GGUF")])
def test_worker_4312_wrong_source_kind_is_model_load_failed(source: object) -> None:
    with pytest.raises(GGUFFormatError) as ei:
        parse_file(source)  # type: ignore[arg-type]
    assert ei.value.field in ("path", "read")
