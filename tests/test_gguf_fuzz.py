"""Fuzzing the GGUF reader from a seed written by gguf-py's own writer (SPEC 4312).

Property: whatever the bytes, parsing either succeeds or raises
``GGUFFormatError`` (never IndexError, struct.error, MemoryError,
UnicodeDecodeError, OverflowError, RecursionError, ValueError...), quickly,
with an offset inside the file; and the in-memory and incremental-read paths
reach the same verdict.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gguf_factory as F
from worker_orcd.errors import ErrorCode
from worker_orcd.gguf import GGMLType, GGUFFormatError, Limits, ValueType, parse_buffer, parse_file
from worker_orcd.gguf import reader as reader_mod

# Each case is ~0.1 ms, so 600 examples per test keep the file at a few seconds.
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CASE_SECONDS = 2.0


def _seed() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return F.gguf_package_seed(Path(d) / "seed.gguf").read_bytes()


SEED = _seed()
SEED_FILE = parse_buffer(SEED)
FIELDS = F.int_fields(SEED)
DATA_END = max(t.data_offset + t.n_bytes for t in SEED_FILE.tensors)

Verdict = tuple[str, object]


def _verdict(parse: object) -> Verdict:
    try:
        return ("ok", repr(parse()))  # type: ignore[operator]  # repr: NaN values compare equal
    except GGUFFormatError as err:
        return ("refused", (err.field, err.offset, err.code))


def check(blob: bytes) -> Verdict:
    """Parse from memory and through the incremental stream reader (tiny reads); compare."""
    t0 = time.perf_counter()
    in_memory = _verdict(lambda: parse_buffer(blob))
    with mock.patch.object(reader_mod, "_FIRST_READ", 16):  # force many on-demand reads
        streamed = _verdict(lambda: parse_file(io.BytesIO(blob)))
    elapsed = time.perf_counter() - t0
    assert elapsed < CASE_SECONDS, f"{elapsed:.2f}s for a {len(blob)}-byte file"
    assert in_memory == streamed
    if in_memory[0] == "refused":
        field, offset, code = in_memory[1]  # type: ignore[misc]
        assert code is ErrorCode.MODEL_LOAD_FAILED
        assert isinstance(field, str) and field
        assert 0 <= offset <= len(blob), (field, offset)
    else:
        g = parse_buffer(blob)
        assert all(t.data_offset + t.n_bytes <= len(blob) for t in g.tensors)
    return in_memory


def test_worker_4312_seed_is_what_gguf_py_wrote() -> None:
    """The seed is worth fuzzing: every value type, nested arrays, four tensor types."""
    assert set(SEED_FILE.value_types.values()) == set(ValueType) - {ValueType.UINT8, ValueType.INT16, ValueType.INT32}
    assert SEED_FILE.array_types["t.nested"] is ValueType.ARRAY
    assert SEED_FILE.metadata["t.nested_str"] == [["x", "yy"], ["zzz"]]
    assert [t.ggml_type for t in SEED_FILE.tensors] == [GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_K]
    assert {f.kind for f in FIELDS} == {"version", "count", "length", "type", "n_dims", "dim", "offset"}


def test_worker_4312_truncation_at_every_length() -> None:
    """Every prefix is refused with an in-file offset, except those that only lose the final padding."""
    for n in range(len(SEED) + 1):
        verdict = check(SEED[:n])
        assert verdict[0] == ("ok" if n >= DATA_END else "refused"), n


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_worker_4312_random_byte_flips(flips: list[tuple[int, int]]) -> None:
    blob = bytearray(SEED)
    for pos, mask in flips:
        blob[pos] ^= mask
    check(bytes(blob))


def _targeted_values(width: int) -> st.SearchStrategy[object]:
    top = 2 ** (8 * width) - 1
    special = [0, 1, 2, 7, 2**31, 2**32 - 1, top, top - 1, 2 ** (8 * width - 1), 2 ** (8 * width - 1) - 1]
    if width == 8:
        special += [2**40, 2**62, 2**63 + 1, 10_001, 1_001, (1 << 22) + 1]
    relative = st.sampled_from(["-1", "+1", "*2", "+256"])
    return st.one_of(st.sampled_from([v for v in special if v <= top]), relative, st.integers(0, top))


@st.composite
def targeted_mutation(draw: st.DrawFn) -> bytes:
    """Overwrite 1-3 length/count/type/dim/offset fields with boundary values or off-by-ones."""
    blob = bytearray(SEED)
    for _ in range(draw(st.integers(1, 3))):
        f = draw(st.sampled_from(FIELDS))
        fmt = "<I" if f.width == 4 else "<Q"
        (orig,) = struct.unpack_from(fmt, blob, f.offset)
        v = draw(_targeted_values(f.width))
        if isinstance(v, str):
            v = {"-1": orig - 1, "+1": orig + 1, "*2": orig * 2, "+256": orig + 256}[v]
        struct.pack_into(fmt, blob, f.offset, v % (2 ** (8 * f.width)))
    return bytes(blob)


@FUZZ
@given(targeted_mutation())
def test_worker_4312_targeted_length_and_count_mutations(blob: bytes) -> None:
    check(blob)


@pytest.mark.parametrize("kind", ["count", "length", "type", "n_dims", "dim", "offset"])
@pytest.mark.parametrize("value", [0, 1, 2**63, 2**64 - 1, "-1", "+1"])
def test_worker_4312_every_field_at_every_boundary(kind: str, value: object) -> None:
    """Exhaustive over the seed's fields of one kind: each set alone to one boundary value."""
    for f in (f for f in FIELDS if f.kind == kind):
        fmt = "<I" if f.width == 4 else "<Q"
        blob = bytearray(SEED)
        (orig,) = struct.unpack_from(fmt, blob, f.offset)
        v = {"-1": orig - 1, "+1": orig + 1}.get(value, value)  # type: ignore[arg-type]
        struct.pack_into(fmt, blob, f.offset, v % (2 ** (8 * f.width)))  # type: ignore[operator]
        check(bytes(blob))


@FUZZ
@given(st.integers(0, len(SEED)), st.integers(0, 64), st.binary(max_size=64))
def test_worker_4312_splices(at: int, delete: int, insert: bytes) -> None:
    """Deleting and inserting bytes shifts every later field: lengths no longer line up."""
    check(SEED[:at] + insert + SEED[at + delete :])


@FUZZ
@given(st.binary(min_size=0, max_size=512))
def test_worker_4312_random_bytes_after_magic(tail: bytes) -> None:
    check(b"GGUF" + tail)
    check(b"GGUF\x03\x00\x00\x00" + tail)


# --- cost ---------------------------------------------------------------------------------------


def _one_tensor_file(path: Path, n_elements: int, size: int | None = None) -> Path:
    head = F.image([F.kv_value("general.architecture", ValueType.STRING, "llama")], [F.tensor_info("w", [n_elements], GGMLType.F32, 0)])
    data_at = -(-len(head) // 32) * 32
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size or data_at + 4 * n_elements)  # sparse: no disk, no page cache
    return path


def test_worker_4310_parse_cost_independent_of_tensor_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 MB and 20 GB (sparse) tensor regions cost the same reads as each other, at most 1 MiB."""
    tiny = _one_tensor_file(tmp_path / "tiny.gguf", 8)
    big = _one_tensor_file(tmp_path / "big.gguf", 50 * 10**6)
    huge = _one_tensor_file(tmp_path / "huge.gguf", 5 * 10**9)
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        reads.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    cost: dict[Path, tuple[int, int]] = {}
    for p, n in ((tiny, 8), (big, 50 * 10**6), (huge, 5 * 10**9)):
        reads.clear()
        assert parse_file(p).tensors[0].n_bytes == 4 * n
        cost[p] = (len(reads), sum(reads))
    assert cost[big] == cost[huge] and cost[big][0] == cost[tiny][0] == 1
    assert cost[big][1] <= 2**20 and cost[tiny][1] == tiny.stat().st_size
    monkeypatch.undo()

    def best_of(p: Path, runs: int = 7) -> float:
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            parse_file(p)
            best = min(best, time.perf_counter() - t0)
        return best

    t_tiny, t_big = best_of(tiny), best_of(big)
    assert t_big < 20 * t_tiny + 0.01, (t_tiny, t_big)  # generous: one 1 MiB read of zeros vs a few hundred bytes


@FUZZ
@given(
    st.builds(
        Limits,
        max_tensors=st.integers(0, 5),
        max_kv_pairs=st.integers(0, 16),
        max_string_bytes=st.integers(0, 24),
        max_array_len=st.integers(0, 6),
        max_array_nesting=st.integers(0, 3),
        max_header_bytes=st.integers(0, 1000),
        max_metadata_elements=st.integers(0, 40),
    ),
    st.integers(0, len(SEED)),
)
def test_worker_4311_tight_limits_hold(limits: Limits, cut: int) -> None:
    """Under any caller limits the outcome is typed, and a successful parse respects every limit."""
    try:
        g = parse_buffer(SEED[:cut], limits)
    except GGUFFormatError:
        return
    assert len(g.tensors) <= limits.max_tensors and len(g.metadata) <= limits.max_kv_pairs
    assert g.header_size <= limits.max_header_bytes

    def walk(v: object, depth: int) -> int:
        if isinstance(v, list):
            assert len(v) <= limits.max_array_len and depth <= limits.max_array_nesting
            return len(v) + sum(walk(x, depth + 1) for x in v)
        if isinstance(v, str):
            assert len(v.encode()) <= limits.max_string_bytes
        return 0

    assert sum(walk(v, 1) for v in g.metadata.values()) <= limits.max_metadata_elements
