"""Bearer-token authentication (SPEC 4200-4203, 4250-4251, 4910-4913).

Tokens come only from a file (never an env var's value). The file may hold
several tokens, one per line, so that each caller (tenant) has its own: a job
is owned by the token that started it and only that token may cancel it.
Comparison is constant-time over SHA-256 digests, so neither the content nor
the length of a configured token leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ErrorCode, WorkerError

MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096
MAX_TOKEN_FILE_BYTES = 64 * 1024


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
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a directory has no text
            raise TokenFileError(f"API token file {path} is not a regular file")
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


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` against the configured tokens."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.replace(tokens)

    def replace(self, tokens: Sequence[str]) -> None:
        """Swap the token set at once (rotation); running jobs keep their owner digest."""
        if not tokens:
            raise ValueError("at least one token is required")
        self._digests = tuple(bytes.fromhex(token_digest(t)) for t in tokens)

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
        for known in self._digests:
            match |= hmac.compare_digest(digest, known)
        if not match:
            raise AuthError("invalid bearer token")
        hexd = digest.hex()
        return Caller(owner=hexd, fp6=hexd[:6])
