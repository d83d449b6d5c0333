"""Bearer-token authentication and the token file (SPEC 4200-4203, 4250-4251, 4910-4913).

Tokens come only from a file (never an env var's value). The file may hold
several tokens, one per line, so that each caller (tenant) has its own: a job
is owned by the token that started it and only that token may cancel it.
Comparison is constant-time over SHA-256 digests, so neither the content nor
the length of a configured token leaks through timing.

The file must be private to its owner: a token that group or others can read
or change is already compromised, so the worker refuses it (mode & 0o077, or a
POSIX ACL granting anyone but this process's user). A symlink is followed and
the file it ends at is what gets checked: Kubernetes secret volumes and atomic
"write new file, swap the link" rotation both rely on links.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ErrorCode, WorkerError

MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096
MAX_TOKEN_FILE_BYTES = 64 * 1024
PRIVATE_MODE_MASK = 0o077  # no bit for group or others

# POSIX access ACL as Linux stores it in the system.posix_acl_access xattr: a u32 version (2),
# then (u16 tag, u16 perm, u32 id) entries. Only the tags that can grant someone else access matter.
_ACL_XATTR = "system.posix_acl_access"
_ACL_HEADER, _ACL_ENTRY = struct.Struct("<I"), struct.Struct("<HHI")
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x02, 0x04, 0x08, 0x10, 0x20


class AuthError(WorkerError):
    code = ErrorCode.AUTH_FAILED


class TokenFileError(WorkerError):
    """The API token file is unusable: the worker refuses to start (SPEC 4913)."""

    code = ErrorCode.AUTH_FAILED


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: ``owner`` (full SHA-256) binds jobs, ``fp6`` goes in logs (4202)."""

    owner: str
    fp6: str


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def fp6(token: str) -> str:
    """First 6 hex characters of SHA-256(token): enough to tell callers apart in a log, useless to an attacker."""
    return token_digest(token)[:6]


def read_token_file(path: Path) -> tuple[str, ...]:
    """Tokens of the file, one per line ('#' comments and blank lines skipped); fail fast on anything odd."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise TokenFileError(f"API token file {path} does not exist (set --api-token-file or WORKER_API_TOKEN_FILE)") from None
    except OSError as e:
        raise TokenFileError(f"API token file {path} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # the opened file itself: no window between checking and reading
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a directory has no text
            raise TokenFileError(f"API token file {path} is not a regular file")
        check_private(path, fd, st)
        if st.st_size > MAX_TOKEN_FILE_BYTES:
            raise TokenFileError(f"API token file {path} is {st.st_size} bytes; the limit is {MAX_TOKEN_FILE_BYTES}")
        data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
    except OSError as e:
        raise TokenFileError(f"API token file {path} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise TokenFileError(f"API token file {path} is not ASCII text") from None
    tokens = [line.strip() for line in text.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise TokenFileError(f"API token file {path} is empty")
    for n, token in enumerate(tokens, 1):
        if len(token) < MIN_TOKEN_CHARS or len(token) > MAX_TOKEN_CHARS:
            raise TokenFileError(
                f"API token file {path}: token {n} has {len(token)} characters; "
                f"tokens must have {MIN_TOKEN_CHARS}..{MAX_TOKEN_CHARS}"
            )
        if any(c.isspace() or not c.isprintable() for c in token):
            raise TokenFileError(f"API token file {path}: token {n} contains whitespace or control characters")
    return tuple(tokens)


def check_private(path: Path, fd: int, st: os.stat_result) -> None:
    """Refuse a token file that anyone but its owner (or, through an ACL, this process's user) can access.

    Root reads any file whatever its mode, so this check, not the kernel, is what enforces the
    rule for a worker started as root. systemd's LoadCredential= grants the service's user read
    access through an ACL, which shows up as group bits in the mode: that one grant is accepted.
    """
    mode = stat.S_IMODE(st.st_mode)
    if not mode & PRIVATE_MODE_MASK:
        return
    acl = _access_acl(fd)
    if acl is None:
        raise TokenFileError(
            f"API token file {path} has mode {mode:04o}: group or others may read or write it; "
            f"run `chmod 600 {path}`"
        )
    mask = next((perm for tag, perm, _ in acl if tag == _ACL_MASK), 0o7)
    me = os.geteuid()
    for tag, perm, ident in acl:
        if tag == _ACL_OTHER and perm:
            who = "others"
        elif tag in (_ACL_GROUP_OBJ, _ACL_GROUP) and perm & mask:
            who = "the owning group" if tag == _ACL_GROUP_OBJ else f"group {ident}"
        elif tag == _ACL_USER and perm & mask and ident != me:
            who = f"user {ident}"
        else:
            continue
        raise TokenFileError(
            f"API token file {path} has an access ACL that lets {who} use it (mode {mode:04o}); "
            f"run `setfacl -b {path} && chmod 600 {path}`"
        )


def _access_acl(fd: int) -> list[tuple[int, int, int]] | None:
    """The file's POSIX access ACL entries, or None when it has none (the mode bits say it all)."""
    try:
        raw = os.getxattr(fd, _ACL_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    body = raw[_ACL_HEADER.size:]
    if len(raw) < _ACL_HEADER.size or len(body) % _ACL_ENTRY.size:
        raise OSError(errno.EINVAL, "malformed POSIX ACL")
    return [_ACL_ENTRY.unpack_from(body, i) for i in range(0, len(body), _ACL_ENTRY.size)]


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` against the configured tokens."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._digests: tuple[bytes, ...] = ()
        self.replace(tokens)

    def replace(self, tokens: Sequence[str]) -> None:
        """Swap the token set at once (rotation); running jobs keep their owner digest.

        One attribute assignment: a request sees either the whole old set or the whole new one.
        """
        if not tokens:
            raise ValueError("at least one token is required")
        self._digests = tuple(bytes.fromhex(token_digest(t)) for t in tokens)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """fp6 of every configured token, for the log line that says which set is live."""
        return tuple(d.hex()[:6] for d in self._digests)

    def authenticate(self, header: str | None) -> Caller:
        if not header:
            raise AuthError("missing Authorization: Bearer token")
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise AuthError("Authorization header must be 'Bearer <token>'")
        if len(presented) > MAX_TOKEN_CHARS:
            raise AuthError("invalid bearer token")
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        # Visit every configured digest: the time taken does not say which one (or none) matched.
        match = False
        for known in self._digests:  # read once: a concurrent replace() cannot mix two sets
            match |= hmac.compare_digest(digest, known)
        if not match:
            raise AuthError("invalid bearer token")
        hexd = digest.hex()
        return Caller(owner=hexd, fp6=hexd[:6])


class TokenFile:
    """The token file and the live ``BearerAuth`` it feeds; ``load()`` again is the SIGHUP rotation.

    A failed (re)load raises and leaves the current tokens in place, so a half-written or
    mis-permissioned new file never locks every caller out.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.auth: BearerAuth | None = None

    def load(self) -> BearerAuth:
        tokens = read_token_file(self.path)
        if self.auth is None:
            self.auth = BearerAuth(tokens)
        else:
            self.auth.replace(tokens)
        return self.auth
