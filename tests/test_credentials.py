"""The API token file (SPEC 4910-4913): where it comes from, who may read it, and rotation on SIGHUP.

Tests run as root in CI, and root reads any file whatever its mode: the mode
refusals below therefore exercise the worker's own check, not the kernel's.
Rotation is tested twice: in-process on the main thread (a real SIGHUP to this
process while a fake-engine job streams) to show what happens to a running job,
and with a real ``worker-orcd serve`` process (no model, CPU) for the real path.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_http_fakes import (
    MODEL_NAME,
    Knobs,
    fake_binding,
    iter_events,
    write_tiny_model,
)

from worker_orcd import logs
from worker_orcd.auth import AuthError, TokenFile, TokenFileError, fp6, read_token_file
from worker_orcd.config import ConfigError, load_config
from worker_orcd.lifecycle import Worker
from worker_orcd.serve import serve

A = "alpha-" + "a" * 32
B = "bravo-" + "b" * 32
C = "charlie-" + "c" * 32
SERVE = [sys.executable, "-m", "worker_orcd", "serve"]


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# --- file checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660, 0o666, 0o700 | 0o004])
def test_worker_4913_token_file_open_to_group_or_others_refused(tmp_path: Path, mode: int) -> None:
    p = private(tmp_path / "token", A, mode)
    with pytest.raises(TokenFileError) as e:
        read_token_file(p)
    msg = e.value.message
    assert str(p) in msg and f"mode {mode:04o}" in msg and f"chmod 600 {p}" in msg
    assert A not in msg


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_worker_4913_owner_only_token_file_accepted(tmp_path: Path, mode: int) -> None:
    assert read_token_file(private(tmp_path / "token", f"{A}\n", mode)) == (A,)


def test_worker_4913_symlink_followed_and_its_target_checked(tmp_path: Path) -> None:
    """Kubernetes secret volumes and atomic swap-the-link rotation use links: follow, check the target."""
    target = private(tmp_path / "real", A)
    link = tmp_path / "token"
    link.symlink_to(target)
    assert read_token_file(link) == (A,)
    target.chmod(0o644)
    with pytest.raises(TokenFileError, match="mode 0644"):
        read_token_file(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "absent")
    with pytest.raises(TokenFileError, match="does not exist"):
        read_token_file(dangling)


def _set_acl(path: Path, entries: list[tuple[int, int, int]]) -> None:
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", raw)
    except OSError as e:
        pytest.skip(f"this file system takes no POSIX ACLs ({e.strerror})")


NOBODY_ID = 0xFFFFFFFF  # "no id" in USER_OBJ / GROUP_OBJ / MASK / OTHER entries


def _acl(named: list[tuple[int, int, int]], group_obj: int = 0) -> list[tuple[int, int, int]]:
    return [(0x01, 4, NOBODY_ID), *[e for e in named if e[0] == 0x02], (0x04, group_obj, NOBODY_ID),
            *[e for e in named if e[0] == 0x08], (0x10, 4, NOBODY_ID), (0x20, 0, NOBODY_ID)]


def test_worker_4913_systemd_credential_acl_for_this_user_accepted(tmp_path: Path) -> None:
    """LoadCredential= writes 0400 plus an ACL `user:<service uid>:r`, which shows as mode 0440."""
    p = private(tmp_path / "token", A, 0o400)
    _set_acl(p, _acl([(0x02, 4, os.geteuid())]))
    assert stat.S_IMODE(p.stat().st_mode) == 0o440
    assert read_token_file(p) == (A,)


@pytest.mark.parametrize(("named", "group_obj", "who"), [
    ([(0x02, 4, 12345)], 0, "user 12345"),
    ([(0x08, 4, 4242)], 0, "group 4242"),
    ([], 4, "the owning group"),
])
def test_worker_4913_acl_granting_someone_else_refused(
    tmp_path: Path, named: list[tuple[int, int, int]], group_obj: int, who: str,
) -> None:
    p = private(tmp_path / "token", A, 0o400)
    _set_acl(p, _acl(named, group_obj))
    with pytest.raises(TokenFileError) as e:
        read_token_file(p)
    assert who in e.value.message and f"setfacl -b {p}" in e.value.message


def test_worker_4910_token_value_in_environment_refused() -> None:
    with pytest.raises(ConfigError) as e:
        load_config({"worker_id": "w"}, env={"WORKER_API_TOKEN": A})
    assert "WORKER_API_TOKEN" in str(e.value) and "never read from the environment" in str(e.value)
    assert A not in str(e.value)


def test_worker_4913_token_file_precedence(tmp_path: Path) -> None:
    """flag > config file > WORKER_API_TOKEN_FILE > $CREDENTIALS_DIRECTORY/worker-token > default."""
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"worker_id": "w", "api_token_file": "/from/config"}))
    env_all = {"WORKER_API_TOKEN_FILE": "/from/env", "CREDENTIALS_DIRECTORY": "/run/credentials/x.service"}

    def path(flags: dict[str, Any], env: dict[str, str], file: Path | None = None) -> str:
        return str(load_config({"worker_id": "w", **flags}, env=env, config_file=file).api_token_file)

    assert path({"api_token_file": "/from/flag"}, env_all, conf) == "/from/flag"
    assert path({}, env_all, conf) == "/from/config"
    assert path({}, env_all) == "/from/env"
    assert path({}, {"CREDENTIALS_DIRECTORY": "/run/credentials/x.service"}) == "/run/credentials/x.service/worker-token"
    assert path({}, {}) == "/etc/llorch/worker-token"


# --- rotation: the token set ----------------------------------------------------------------


def test_worker_4913_reload_swaps_tokens_and_a_bad_file_keeps_the_old_set(tmp_path: Path) -> None:
    p = private(tmp_path / "token", A)
    tf = TokenFile(p)
    auth = tf.load()
    auth.authenticate(f"Bearer {A}")
    private(p, f"{B}\n{C}\n")
    assert tf.load() is auth  # the same object the HTTP app holds
    assert auth.fingerprints == (fp6(B), fp6(C))
    with pytest.raises(AuthError):
        auth.authenticate(f"Bearer {A}")
    for bad in ("", "short\n"):
        private(p, bad)
        with pytest.raises(TokenFileError):
            tf.load()
    p.write_text(A)
    p.chmod(0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        tf.load()
    auth.authenticate(f"Bearer {B}")  # every failure above kept the previous set
    assert auth.fingerprints == (fp6(B), fp6(C))


# --- rotation in-process: a real SIGHUP while a job streams ----------------------------------


def _poll(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def test_worker_4913_sighup_rotation_running_job_keeps_its_owner(tmp_path: Path) -> None:
    """Token A starts a job, A is rotated out: the job runs to its end; A gets 401 and B 403 on /cancel.

    serve() runs on this (main) thread so its SIGHUP handler is installed; the client is a thread.
    """
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    root = tmp_path / "models"
    root.mkdir()
    write_tiny_model(root / MODEL_NAME)
    token_file = private(tmp_path / "token", f"{A}\n")
    config = load_config({
        "worker_id": "w-rot", "device": "cpu", "bind": "127.0.0.1:0", "model_root": str(root), "model": MODEL_NAME,
        "api_token_file": str(token_file), "shutdown_timeout_sec": 5, "sse_keepalive_sec": 1,
    }, env={})
    knobs = Knobs(step_s=0.03)
    box: dict[str, Any] = {}
    log = io.StringIO()
    logs.configure("info", stream=log, worker_id="w-rot", gpu_device=0, device="cpu")

    def capture(worker: Worker) -> None:
        box["worker"], box["loop"] = worker, asyncio.get_running_loop()

    def client() -> None:
        try:
            _poll(lambda: "worker" in box and box["worker"].uri is not None and box["worker"].state.value == "ready", 20)
            url = box["worker"].uri
            hdr = {"A": {"Authorization": f"Bearer {A}"}, "B": {"Authorization": f"Bearer {B}"}}
            with httpx.Client(base_url=url, timeout=10) as c, c.stream(
                "POST", "/worker/execute", headers=hdr["A"],
                json={"prompt": "abcdef", "params": {"max_tokens": 60}, "job_id": "job-rot"},
            ) as r:
                it = iter_events(r)
                assert next(it)[0] == "started"
                private(token_file, f"{B}\n")
                os.kill(os.getpid(), signal.SIGHUP)
                _poll(lambda: c.get("/worker/ready", headers=hdr["A"]).status_code == 401, 5)
                assert c.get("/worker/ready", headers=hdr["B"]).status_code == 200
                box["cancel_a"] = c.post("/cancel", headers=hdr["A"], json={"job_id": "job-rot"})
                box["cancel_b"] = c.post("/cancel", headers=hdr["B"], json={"job_id": "job-rot"})
                box["events"] = [e for e, _ in it]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            box["error"] = e
        finally:
            if "loop" in box:
                box["loop"].call_soon_threadsafe(box["worker"].request_shutdown, "test")

    t = threading.Thread(target=client, daemon=True)
    t.start()
    forced: list[int] = []
    code = asyncio.run(serve(config, fake_binding(knobs, []), force_exit=forced.append, on_worker=capture))
    t.join(10)
    if "error" in box:
        raise box["error"]
    assert code == 0 and not forced
    assert box["cancel_a"].status_code == 401 and box["cancel_a"].json()["code"] == "AUTH_FAILED"
    assert box["cancel_b"].status_code == 403 and box["cancel_b"].json()["code"] == "FORBIDDEN"
    assert box["events"][-1] == "end" and box["events"].count("token") >= 1  # the job ran to its end
    records = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    (reloaded,) = [r for r in records if r["event"] == "tokens_reloaded"]
    assert fp6(B) in reloaded["human"] and A not in log.getvalue() and B not in log.getvalue()


# --- rotation in a real process -------------------------------------------------------------


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A directory the worker can still reach after dropping to nobody (pytest's tmp is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="worker-orcd-cred-", dir="/tmp"))
    if os.geteuid() == 0:
        os.chown(d, 65534, 65534)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _write_owned(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace the file atomically (write + rename), owned by the worker's user."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.chmod(mode)
    if os.geteuid() == 0:
        os.chown(tmp, 65534, 65534)
    tmp.replace(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_worker_4913_sighup_rotation_in_a_real_process(private_dir: Path, tmp_path: Path) -> None:
    """Real `worker-orcd serve` (no model, CPU; dropped to nobody when run as root): SIGHUP swaps the tokens."""
    old, new, rejected = secrets.token_hex(24), secrets.token_hex(24), secrets.token_hex(24)
    token_file = private_dir / "worker-token"
    _write_owned(token_file, old + "\n")
    port = _free_port()
    user = ["--user", "nobody"] if os.geteuid() == 0 else []
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*SERVE, "--worker-id", "w-hup", "--device", "cpu", "--port", str(port), "--api-token-file", str(token_file),
             *user], stdout=fh, stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def status(token: str) -> int:
            return httpx.get(f"{url}/worker/ready", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code

        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _poll(up, 120)
        assert status(old) == 200 and status(new) == 401
        _write_owned(token_file, f"# rotated\n{new}\n")
        proc.send_signal(signal.SIGHUP)
        _poll(lambda: status(old) == 401, 10)
        assert status(new) == 200
        _write_owned(token_file, rejected + "\n", mode=0o644)  # a bad new file: refused, old set kept
        proc.send_signal(signal.SIGHUP)
        _poll(lambda: any(e["event"] == "tokens_reload_failed" for e in _events(log)), 10)
        assert status(new) == 200 and status(rejected) == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()[-3000:]
    events = _events(log)
    (failed,) = [e for e in events if e["event"] == "tokens_reload_failed"]
    assert failed["level"] == "error" and "mode 0644" in failed["human"] and "chmod 600" in failed["human"]
    assert next(e for e in events if e["event"] == "tokens_reloaded")["human"].count(fp6(new)) == 1
    text = log.read_text()
    assert old not in text and new not in text and rejected not in text


def test_worker_4913_startup_refuses_group_readable_token_file(tmp_path: Path) -> None:
    """Fails fast (exit 1) before the device is opened, naming the path, the mode and the fix."""
    token_file = private(tmp_path / "token", secrets.token_hex(24), 0o640)
    root = ["--allow-root"] if os.geteuid() == 0 else []
    run = subprocess.run(
        [*SERVE, "--worker-id", "w", "--device", "cpu", "--api-token-file", str(token_file), *root],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    (failed,) = [json.loads(line) for line in run.stderr.splitlines() if '"startup_failed"' in line]
    assert str(token_file) in failed["human"] and "mode 0640" in failed["human"] and "chmod 600" in failed["human"]
    assert '"device_open"' not in run.stderr
