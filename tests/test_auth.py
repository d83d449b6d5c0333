"""Bearer auth and the token file (SPEC 4200-4203, 4251, 4910-4913)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from worker_orcd.auth import AuthError, BearerAuth, TokenFileError, fp6, read_token_file
from worker_orcd.errors import ErrorCode

A = "alpha-token-0123456789"
B = "bravo-token-0123456789"


def write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "token"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    p.chmod(0o600)  # SPEC 4913: anything looser is refused (tests/test_credentials.py)
    return p


def test_worker_4913_reads_tokens_skipping_comments_and_blank_lines(tmp_path: Path) -> None:
    p = write(tmp_path, f"# orchestrator\n{A}\n\n  {B}  \n")
    assert read_token_file(p) == (A, B)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "is empty"),
        ("\n# only a comment\n\n", "is empty"),
        ("short\n", "token 1 has 5 characters"),
        (A + "\n" + "x" * 5000, "token 2 has 5000 characters"),
        ("abc\u00e9defghijklmnopqrstu", "not ASCII"),
        ("tab\tinside-a-long-token", "whitespace or control"),
    ],
)
def test_worker_4913_refuses_unusable_token_file(tmp_path: Path, content: str, needle: str) -> None:
    with pytest.raises(TokenFileError) as e:
        read_token_file(write(tmp_path, content))
    assert needle in e.value.message
    assert e.value.code == ErrorCode.AUTH_FAILED


def test_worker_4913_missing_token_file_names_the_path_and_setting(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError) as e:
        read_token_file(tmp_path / "nope")
    assert str(tmp_path / "nope") in e.value.message and "--api-token-file" in e.value.message


def test_worker_4913_directory_and_oversized_files_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="not a regular file"):
        read_token_file(tmp_path)
    with pytest.raises(TokenFileError, match="the limit is"):
        read_token_file(write(tmp_path, "#" * 70_000))


NOBODY = 65534


def _read_as_nobody(paths: list[Path]) -> list[str]:
    """``read_token_file`` on each path in a forked child that dropped to uid/gid nobody (root reads
    any file whatever its mode, and CI runs as root): its tokens, or the TokenFileError message."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop, read, report, and never return into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            out = []
            for p in paths:
                try:
                    out.append(",".join(read_token_file(p)))
                except TokenFileError as e:
                    out.append(e.message)
            os.write(w, "\n".join(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed to drop to nobody"
    return data.split("\n")


def test_worker_4913_unreadable_token_file_refused(tmp_path: Path) -> None:
    """Mode 000: refused by the reader (as nobody when the suite runs as root, so CI runs it too)."""
    if os.geteuid() != 0:
        p = write(tmp_path, A)
        p.chmod(0)
        with pytest.raises(TokenFileError, match="cannot be opened"):
            read_token_file(p)
        return
    d = Path(tempfile.mkdtemp(prefix="worker-orcd-auth-", dir="/tmp"))  # pytest's tmp is root-only
    try:
        os.chown(d, NOBODY, NOBODY)
        readable, unreadable = write(d, A), d / "unreadable"
        unreadable.write_text(A)
        for f, mode in ((readable, 0o600), (unreadable, 0)):
            os.chown(f, NOBODY, NOBODY)
            f.chmod(mode)
        got = _read_as_nobody([readable, unreadable])
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert got[0] == A  # the control: nobody reaches the directory and reads a 0600 file it owns
    assert "cannot be opened: Permission denied" in got[1], got


def test_worker_4202_fp6_is_sha256_prefix() -> None:
    assert fp6(A) == hashlib.sha256(A.encode()).hexdigest()[:6]


def test_worker_4203_authenticate_accepts_each_configured_token_as_its_own_caller() -> None:
    auth = BearerAuth([A, B])
    a, b = auth.authenticate(f"Bearer {A}"), auth.authenticate(f"bearer {B}")
    assert a.owner != b.owner  # SPEC 4251: jobs are bound to the token that started them
    assert a.fp6 == fp6(A) and b.fp6 == fp6(B)
    assert a.owner == hashlib.sha256(A.encode()).hexdigest()


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", f"Basic {A}", f"Token {A}", "Bearer wrong-token-0123456789", f"Bearer {A}x", f"Bearer {A[:-1]}",
     "Bearer " + "x" * 10_000],
)
def test_worker_4203_bad_or_missing_token_refused(header: str | None) -> None:
    with pytest.raises(AuthError) as e:
        BearerAuth([A]).authenticate(header)
    assert e.value.code == ErrorCode.AUTH_FAILED and e.value.http_status == 401
    assert A not in e.value.message  # never echo a secret


def test_worker_4913_rotation_replaces_the_token_set() -> None:
    auth = BearerAuth([A])
    auth.replace([B])
    auth.authenticate(f"Bearer {B}")
    with pytest.raises(AuthError):
        auth.authenticate(f"Bearer {A}")
    with pytest.raises(ValueError):
        auth.replace([])
