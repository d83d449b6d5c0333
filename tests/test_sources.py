"""Model locations and root confinement (SPEC 4340-4343, "Model locations", 4225)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from worker_orcd.errors import ErrorCode, InvalidParams, ModelLoadError
from worker_orcd.sources import (
    DEFAULT_MODEL_ROOT,
    MAX_MODEL_SIZE,
    SHM_DIR,
    ModelSource,
    check_model_size,
    model_size,
    open_model,
    resolve_model_root,
    resolve_model_source,
)

PAYLOAD = b"GGUF" + bytes(range(256)) * 4


@pytest.fixture
def root(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "m.gguf").write_bytes(PAYLOAD)
    (models / "sub" / "n.gguf").write_bytes(b"other")
    (tmp_path / "outside.gguf").write_bytes(b"secret")
    return models


@pytest.fixture
def shm_segment() -> Iterator[str]:
    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm on this system")
    name = f"worker-orcd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = SHM_DIR / name
    path.write_bytes(PAYLOAD)
    try:
        yield name
    finally:
        path.unlink(missing_ok=True)


def _refused(ref: str, root: Path | str) -> str:
    return _refusal(ref, root).message


def _refusal(ref: str, root: Path | str) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        resolve_model_source(ref, root)
    assert info.value.code is ErrorCode.MODEL_LOAD_FAILED
    return info.value


# --- plain paths and file: URIs ----------------------------------------------------------------


def test_worker_4340_relative_path_resolves_against_root(root: Path) -> None:
    src = resolve_model_source("m.gguf", root)
    assert src == ModelSource(ref="m.gguf", kind="file", path=root.resolve() / "m.gguf")
    assert resolve_model_source("sub/n.gguf", root).path == root.resolve() / "sub" / "n.gguf"


def test_worker_4340_absolute_plain_path_inside_root(root: Path) -> None:
    assert resolve_model_source(str(root / "m.gguf"), root).path == root.resolve() / "m.gguf"


@pytest.mark.parametrize("form", ["file:{p}", "file://{p}", "file://localhost{p}", "FILE:{p}"])
def test_worker_file_uri_forms(root: Path, form: str) -> None:
    ref = form.format(p=root / "m.gguf")
    src = resolve_model_source(ref, root)
    assert src.kind == "file" and src.ref == ref and src.path == root.resolve() / "m.gguf"


def test_worker_file_uri_percent_escapes_are_decoded(root: Path) -> None:
    (root / "with space.gguf").write_bytes(b"x")
    src = resolve_model_source(f"file://{root}/with%20space.gguf", root)
    assert src.path.name == "with space.gguf"
    assert "NUL" in _refused(f"file://{root}/m.gguf%00", root)
    assert "UTF-8" in _refused(f"file://{root}/%ff.gguf", root)


def test_worker_file_uri_remote_host_and_relative_path_refused(root: Path) -> None:
    assert "only local files" in _refused(f"file://example.com{root}/m.gguf", root)
    assert "absolute path" in _refused("file:m.gguf", root)


def test_worker_4341_dotdot_outside_root_refused(root: Path) -> None:
    err = _refusal("../outside.gguf", root)
    resolved_root = root.resolve()
    assert "resolves outside the model root" in err.message and "--model-root" in err.message
    assert str(resolved_root) not in err.message  # the caller learns the rule, not the layout (issue 10, 9)
    assert err.detail is not None and str(resolved_root.parent / "outside.gguf") in err.detail  # the log does


def test_worker_4341_dotdot_staying_inside_root_is_fine(root: Path) -> None:
    assert resolve_model_source("sub/../m.gguf", root).path == root.resolve() / "m.gguf"


def test_worker_4341_absolute_path_elsewhere_refused(root: Path) -> None:
    err = _refusal("/etc/passwd", root)
    assert err.message == (
        "model path resolves outside the model root (set --model-root to the directory that holds your models)"
    )
    assert err.detail == f"/etc/passwd resolves to /etc/passwd, outside the model root {root.resolve()}"
    assert "resolves outside" in _refused(f"file:{root.parent}/outside.gguf", root)


def test_worker_4341_outside_root_refused_before_existence_is_checked(root: Path) -> None:
    """No existence oracle: a missing file outside the root gets the confinement error."""
    assert "resolves outside" in _refused("../does-not-exist.gguf", root)


def test_worker_4342_symlink_inside_root_pointing_outside_refused(root: Path) -> None:
    (root / "evil.gguf").symlink_to(root.parent / "outside.gguf")
    err = _refusal("evil.gguf", root)
    assert "resolves outside" in err.message and "outside.gguf" not in err.message  # no symlink target
    assert err.detail is not None and str(root.parent.resolve() / "outside.gguf") in err.detail
    (root / "evil-dir").symlink_to(root.parent)
    assert "resolves outside" in _refused("evil-dir/outside.gguf", root)


def test_worker_4342_symlink_inside_root_is_canonicalised(root: Path) -> None:
    (root / "latest.gguf").symlink_to("sub/n.gguf")
    assert resolve_model_source("latest.gguf", root).path == root.resolve() / "sub" / "n.gguf"


def test_worker_4342_symlinked_root_itself_is_fine(root: Path, tmp_path: Path) -> None:
    link = tmp_path / "root-link"
    link.symlink_to(root)
    assert resolve_model_source("m.gguf", link).path == root.resolve() / "m.gguf"
    assert resolve_model_source(str(link / "m.gguf"), link).path == root.resolve() / "m.gguf"
    assert resolve_model_root(link) == root.resolve()


def test_worker_4343_missing_file_and_non_regular_files_refused(root: Path) -> None:
    assert "not found" in _refused("nope.gguf", root)
    assert "is a directory" in _refused("sub", root)
    os.mkfifo(root / "fifo.gguf")
    assert "not a regular file" in _refused("fifo.gguf", root)


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("m.gguf\0.txt", "NUL"),
        ("a" * 5000, "limit"),
        ("http://example.com/m.gguf", "unknown scheme 'http:'"),
        ("s3:bucket/m.gguf", "unknown scheme 's3:'"),
    ],
)
def test_worker_4343_bad_references_refused(root: Path, ref: str, needle: str) -> None:
    assert needle in _refused(ref, root)


def test_worker_relative_name_with_colon_via_dot_slash(root: Path) -> None:
    (root / "model:v1.gguf").write_bytes(b"x")
    assert "./model:v1.gguf" in _refused("model:v1.gguf", root)  # the hint shows the fix
    assert resolve_model_source("./model:v1.gguf", root).path.name == "model:v1.gguf"


def test_worker_model_root_must_exist_and_be_a_directory(root: Path, tmp_path: Path) -> None:
    message = _refused("m.gguf", tmp_path / "missing")
    assert "does not exist" in message and "--model-root" in message
    assert "not a directory" in _refused("m.gguf", root / "m.gguf")


def test_worker_default_model_root() -> None:
    assert DEFAULT_MODEL_ROOT == Path("/var/lib/worker-orcd/models")


# --- shm:NAME ------------------------------------------------------------------------------------


def test_worker_shm_segment_resolves_outside_file_root(root: Path, shm_segment: str) -> None:
    src = resolve_model_source(f"shm:{shm_segment}", root)
    assert src == ModelSource(ref=f"shm:{shm_segment}", kind="shm", path=SHM_DIR.resolve() / shm_segment)
    with open_model(src) as fh:
        assert fh.read() == PAYLOAD
        assert model_size(fh) == len(PAYLOAD)


def test_worker_shm_segment_from_python_shared_memory(root: Path) -> None:
    """The pool manager's segments (shm_open via multiprocessing) are what shm:NAME names."""
    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm on this system")
    seg = shared_memory.SharedMemory(create=True, size=4096)
    try:
        seg.buf[:4] = b"GGUF"
        src = resolve_model_source(f"shm:{seg.name}", root)
        with open_model(src) as fh:
            assert fh.read(4) == b"GGUF" and model_size(fh) == 4096
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("", "no segment name"),
        ("a/b", "contains '/'"),
        ("/psm_abc", "no leading '/'"),
        ("..", "not allowed"),
        ("a..b", "not allowed"),
        (".hidden", "not allowed"),
        ("-flag", "not allowed"),
        ("has space", "not allowed"),
        ("x" * 256, "limit"),
    ],
)
def test_worker_shm_bad_names_refused(root: Path, name: str, needle: str) -> None:
    assert needle in _refused(f"shm:{name}", root)


def test_worker_shm_missing_and_symlinked_segments_refused(root: Path) -> None:
    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm on this system")
    name = f"worker-orcd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    assert "does not exist" in _refused(f"shm:{name}", root)
    link = SHM_DIR / name
    link.symlink_to(root / "m.gguf")
    try:
        assert "symlink" in _refused(f"shm:{name}", root)
    finally:
        link.unlink()


# --- open_model: the descriptor that is hashed is the file that was resolved ---------------------


def test_worker_open_model_reads_resolved_file(root: Path) -> None:
    with open_model(resolve_model_source("m.gguf", root)) as fh:
        assert not fh.writable()
        assert model_size(fh) == len(PAYLOAD)
        assert fh.read() == PAYLOAD


def test_worker_open_model_refuses_symlink_swapped_in_after_resolution(root: Path) -> None:
    src = resolve_model_source("m.gguf", root)
    (root / "m.gguf").unlink()
    (root / "m.gguf").symlink_to(root.parent / "outside.gguf")
    with pytest.raises(ModelLoadError, match="replaced by a symlink"):
        open_model(src)


def test_worker_open_model_refuses_fifo_swapped_in_without_blocking(root: Path) -> None:
    src = resolve_model_source("m.gguf", root)
    (root / "m.gguf").unlink()
    os.mkfifo(root / "m.gguf")  # a blocking open of a FIFO without a writer would hang here
    with pytest.raises(ModelLoadError, match="no longer a regular file"):
        open_model(src)


def test_worker_open_model_missing_file(root: Path) -> None:
    src = resolve_model_source("m.gguf", root)
    (root / "m.gguf").unlink()
    with pytest.raises(ModelLoadError, match="cannot open model"):
        open_model(src)


# --- SPEC 4225 size cap --------------------------------------------------------------------------


def test_worker_4225_size_cap() -> None:
    check_model_size(MAX_MODEL_SIZE)
    check_model_size(100, max_size=100)
    with pytest.raises(ModelLoadError, match="MAX_MODEL_SIZE limit of 100 bytes"):
        check_model_size(101, max_size=100)
    with pytest.raises(ModelLoadError, match="MAX_MODEL_SIZE"):
        check_model_size(MAX_MODEL_SIZE + 1)
    for bad in (0, -1, MAX_MODEL_SIZE + 1):
        with pytest.raises(InvalidParams, match="max_model_size"):
            check_model_size(1, max_size=bad)
