"""Model locations and root confinement (SPEC 4340-4343, "Model locations", 4225).

A model reference names the bytes the worker will hash, verify and upload:

* ``file:/abs/model.gguf`` or ``file:///abs/model.gguf`` (percent-escapes are
  decoded, as in any file URI; a host part other than ``localhost`` is refused),
* a plain path, absolute or relative to the model root,
* ``shm:NAME``: a segment the pool manager staged in RAM with ``shm_open``;
  on Linux that is the regular file ``/dev/shm/NAME``.

Every file path is canonicalised (``..`` and every symlink resolved) and must
lie under the canonical model root, so a reference cannot reach ``/etc`` by
``..``, by an absolute path, or by a symlink planted inside the root. Shared
memory is a separate namespace: not under the model root, but confined to
``/dev/shm`` itself. The model is then opened with ``O_NOFOLLOW`` and checked
through ``fstat`` on the descriptor that is hashed, so swapping the final
component for a symlink or a FIFO after resolution cannot redirect the load.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import unquote

from .errors import InvalidParams, ModelLoadError
from .gguf.constants import Limits

DEFAULT_MODEL_ROOT = Path("/var/lib/worker-orcd/models")
SHM_DIR = Path("/dev/shm")
MAX_MODEL_SIZE = Limits.max_file_size  # SPEC 4225: 100 GB unless configured lower
MAX_REF_LENGTH = 4096  # PATH_MAX on Linux: anything longer cannot name a file
MAX_SHM_NAME_LENGTH = 255  # NAME_MAX: a segment name is one directory entry
# A leading letter or digit keeps names like '-x' or '.hidden' (and '.', '..') out.
_SHM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_ROOT_HINT = "set --model-root to the directory that holds your models"

SourceKind = Literal["file", "shm"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference; ``path`` is canonical (no symlinks, no ``..``)."""

    ref: str
    kind: SourceKind
    path: Path


def resolve_model_root(model_root: str | Path) -> Path:
    """Canonical model root; it must exist and be a directory, or nothing can load."""
    raw = os.fspath(model_root)
    if not raw or "\0" in raw:
        raise ModelLoadError(f"the model root is not a usable path ({_ROOT_HINT})", detail=f"model root {raw!r}")
    try:
        root = Path(raw).resolve(strict=True)
    except FileNotFoundError:
        raise ModelLoadError(f"the model root does not exist ({_ROOT_HINT})", detail=f"model root {raw}") from None
    except (OSError, RuntimeError) as e:  # RuntimeError: symlink loop on older Pythons
        raise ModelLoadError(
            f"the model root cannot be resolved ({_ROOT_HINT})", detail=f"model root {raw}: {e}"
        ) from None
    if not root.is_dir():
        raise ModelLoadError(
            f"the model root is not a directory ({_ROOT_HINT})", detail=f"model root {raw} (resolved to {root})"
        )
    return root


def resolve_model_source(ref: str, model_root: str | Path) -> ModelSource:
    """Turn a model reference into a canonical, confined, existing regular file."""
    if not isinstance(ref, str):
        raise ModelLoadError(f"model reference must be a string, got {type(ref).__name__}")
    if not ref.strip():
        raise ModelLoadError("model reference is empty (give a path, file:/abs/path.gguf or shm:NAME)")
    if "\0" in ref:
        raise ModelLoadError("model reference contains a NUL byte")
    if len(ref) > MAX_REF_LENGTH:
        raise ModelLoadError(f"model reference is {len(ref)} characters long; the limit is {MAX_REF_LENGTH}")

    scheme = _SCHEME.match(ref)
    if scheme is None:
        return _resolve_file(ref, ref, model_root)
    name = scheme.group(1).lower()
    rest = ref[scheme.end():]
    if name == "file":
        return _resolve_file(ref, _file_uri_path(ref, rest), model_root)
    if name == "shm":
        return _resolve_shm(ref, rest)
    raise ModelLoadError(
        f"model reference {ref!r} has unknown scheme {name + ':'!r}; use a path, file:/abs/path.gguf "
        f"or shm:NAME (for a relative file name containing ':', write ./{ref})"
    )


def _file_uri_path(ref: str, rest: str) -> str:
    """Path part of a ``file:`` URI (RFC 8089: ``file:/p``, ``file:///p``, ``file://localhost/p``)."""
    if rest.startswith("//"):
        host, sep, tail = rest[2:].partition("/")
        if host.lower() not in ("", "localhost"):
            raise ModelLoadError(f"model reference {ref!r} names host {host!r}; only local files can be loaded")
        rest = sep + tail
    if not rest.startswith("/"):
        raise ModelLoadError(
            f"model reference {ref!r}: a file: URI needs an absolute path (file:/abs/model.gguf); "
            f"give a plain path to resolve it against the model root"
        )
    try:
        path = unquote(rest, errors="strict")
    except UnicodeDecodeError:
        raise ModelLoadError(f"model reference {ref!r} has percent-escapes that are not UTF-8") from None
    if "\0" in path:
        raise ModelLoadError(f"model reference {ref!r} decodes to a path with a NUL byte")
    return path


def _resolve_file(ref: str, raw_path: str, model_root: str | Path) -> ModelSource:
    root = resolve_model_root(model_root)
    candidate = Path(raw_path)
    if not candidate.is_absolute():
        candidate = root / candidate
    # Confinement is decided on the fully resolved path before anything is said about
    # existence, so a reference outside the root learns nothing about what lives there.
    # The caller learns the rule that refused it; where the path led (symlink targets, the
    # model root, /proc/<pid>/...) goes only to the operator's log (issue 10, defect 9).
    try:
        resolved = Path(os.path.realpath(candidate))
    except (OSError, ValueError) as e:
        raise ModelLoadError("model path cannot be resolved", detail=f"{raw_path}: {e}") from None
    outside = f"model path resolves outside the model root ({_ROOT_HINT})"
    if not resolved.is_relative_to(root):
        raise ModelLoadError(outside, detail=f"{raw_path} resolves to {resolved}, outside the model root {root}")
    try:
        canonical = resolved.resolve(strict=True)
    except FileNotFoundError:
        raise ModelLoadError("model file not found under the model root", detail=f"looked for {resolved}") from None
    except (OSError, RuntimeError) as e:
        raise ModelLoadError("model path cannot be resolved", detail=f"{raw_path}: {e}") from None
    if not canonical.is_relative_to(root):  # changed between the two resolutions
        raise ModelLoadError(outside, detail=f"{raw_path} resolves to {canonical}, outside the model root {root}")
    _require_regular(canonical, raw_path)
    return ModelSource(ref=ref, kind="file", path=canonical)


def _resolve_shm(ref: str, name: str) -> ModelSource:
    if not name:
        raise ModelLoadError("shm: reference has no segment name (expected shm:NAME)")
    if "/" in name:
        raise ModelLoadError(
            f"shm segment name {name!r} contains '/'; give the bare name (shm:NAME, no leading '/')"
        )
    if len(name) > MAX_SHM_NAME_LENGTH:
        raise ModelLoadError(f"shm segment name is {len(name)} characters long; the limit is {MAX_SHM_NAME_LENGTH}")
    if ".." in name or not _SHM_NAME.fullmatch(name):
        raise ModelLoadError(
            f"shm segment name {name!r} is not allowed: use letters, digits, '.', '_', '-', "
            f"starting with a letter or digit, and no '..'"
        )
    try:
        shm_root = SHM_DIR.resolve(strict=True)
    except OSError:
        raise ModelLoadError(f"shared-memory model {ref!r} needs {SHM_DIR}, which this system lacks") from None
    path = shm_root / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ModelLoadError(f"shm segment {name!r} does not exist") from None
    except OSError as e:
        raise ModelLoadError(f"shm segment {name!r} cannot be read", detail=f"{path}: {e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ModelLoadError(f"shm segment {name!r} is a symlink; a staged segment must be a regular file")
    _require_regular(path, ref)
    return ModelSource(ref=ref, kind="shm", path=path)


def _require_regular(path: Path, shown: str) -> None:
    """Only regular files: a FIFO would block the load, a device would stream forever."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ModelLoadError("model file cannot be read", detail=f"{shown} ({path}): {e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ModelLoadError(f"model path is {kind}", detail=f"{shown} ({path})")


def open_model(source: ModelSource) -> BinaryIO:
    """Open read-only without following a final symlink; the caller hashes and parses this handle.

    ``O_NONBLOCK`` keeps a FIFO swapped in after resolution from hanging the open;
    ``fstat`` on the descriptor then refuses it.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(source.path, flags)
    except OSError as e:
        reason = "it was replaced by a symlink after resolution" if _is_symlink_error(e) else "the file cannot be read"
        raise ModelLoadError(f"cannot open model: {reason}", detail=f"{source.path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError("model is no longer a regular file", detail=str(source.path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_symlink_error(e: OSError) -> bool:
    return e.errno in (errno.ELOOP, getattr(errno, "EMLINK", -1))


def model_size(fh: BinaryIO) -> int:
    """Size of the opened file, from the same descriptor that is hashed (no path re-lookup)."""
    return os.fstat(fh.fileno()).st_size


def check_model_size(size: int, max_size: int = MAX_MODEL_SIZE) -> None:
    """SPEC 4225: refuse before reading a byte of a file over the configured cap."""
    if not 0 < max_size <= MAX_MODEL_SIZE:  # lowered by config, never raised or disabled
        raise InvalidParams(f"max_model_size must be in 1..{MAX_MODEL_SIZE} bytes, got {max_size}")
    if size > max_size:
        raise ModelLoadError(
            f"model file is {size} bytes, over the MAX_MODEL_SIZE limit of {max_size} bytes"
        )
