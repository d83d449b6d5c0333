"""Running unprivileged (SPEC 4900-4903): root policy, the privilege drop as /proc shows it.

CI runs as root, which is what these tests need: a real ``worker-orcd serve``
(CPU, no model, so it starts in seconds) started as root with ``--user nobody``
is inspected through ``/proc/<pid>/status`` and ``/proc/<pid>/task/*/status``.
Small ``python -c`` children exercise ``privileges.drop`` without torch,
including the case the verification must catch.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker_orcd.privileges import (
    Account,
    DropPlan,
    PrivilegeError,
    decide,
    lookup_account,
    parse_status,
    thread_creds,
)

SERVE = [sys.executable, "-m", "worker_orcd", "serve"]
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


# --- the policy -----------------------------------------------------------------------------


def test_worker_4900_root_without_user_refused() -> None:
    with pytest.raises(PrivilegeError) as e:
        decide(None, False, 0)
    assert "refusing to run as root" in e.value.message and "--user NAME" in e.value.message


def test_worker_4901_root_with_user_plans_the_drop_and_allow_root_keeps_root() -> None:
    assert decide("nobody", False, 0) == DropPlan(Account("nobody", NOBODY, NOBODY))
    assert decide(None, True, 0) is None


def test_worker_4903_unprivileged_start_sheds_capabilities_only() -> None:
    assert decide(None, False, 1000) == DropPlan(None)
    assert decide("nobody", False, NOBODY) == DropPlan(None)  # already that user: nothing to switch
    with pytest.raises(PrivilegeError, match="only root can switch users"):
        decide("nobody", False, 1000)


@pytest.mark.parametrize(("user", "needle"), [
    ("root", "unprivileged user"), ("0", "unprivileged user"), ("no-such-user-xyz", "no such user"),
    ("4000000000", "no user has uid"),
])
def test_worker_4901_user_must_exist_and_not_be_root(user: str, needle: str) -> None:
    with pytest.raises(PrivilegeError, match=needle):
        lookup_account(user)


def test_worker_4901_numeric_uid_accepted() -> None:
    assert lookup_account(str(NOBODY)).uid == NOBODY


def test_worker_4901_status_parsing() -> None:
    text = (
        "Name:\tpython\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\nGroups:\t\n"
        "CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n"
        "CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n"
    )
    t = parse_status(7, text)
    assert (t.tid, t.uids, t.gids, t.groups, t.no_new_privs) == (7, (NOBODY,) * 4, (NOBODY,) * 4, (), True)
    assert (t.cap_eff, t.cap_bnd) == (0, 0x1FFFFFFFFFF)
    me = {t.tid: t for t in thread_creds()}  # by tid: after a pid wrap-around the main thread's is not the lowest
    assert os.getpid() in me and me[os.getpid()].uids[0] == os.getuid()


# --- the CLI refuses before doing anything --------------------------------------------------


@as_root
def test_worker_4900_cli_as_root_without_user_exits_2(tmp_path: Path) -> None:
    run = subprocess.run([*SERVE, "--worker-id", "w", "--device", "cpu"], check=False, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("worker-orcd: error: refusing to run as root (SPEC 4900)")
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "needle"), [
    (["--user", "no-such-user-xyz"], "--user no-such-user-xyz: no such user"),
    (["--user", "root"], "must name an unprivileged user"),
    (["--user", "nobody", "--allow-root"], "allow_root and user exclude each other"),
    (["--user", "bad name"], "config: user (--user): must be a user name"),
])
def test_worker_4901_cli_bad_user_exits_2(args: list[str], needle: str) -> None:
    run = subprocess.run([*SERVE, "--worker-id", "w", "--device", "cpu", *args], check=False, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and needle in run.stderr, run.stderr


# --- privileges.drop in a small child (no torch) ---------------------------------------------


_CHILD = textwrap.dedent("""
    import json, os, sys, threading
    from worker_orcd import privileges as p
    early = sys.argv[1] == "early"
    plan = p.DropPlan(p.lookup_account("nobody"))
    stop = threading.Event()
    if early:
        p.harden_early(plan)
    t = threading.Thread(target=stop.wait)
    t.start()  # a thread that exists at drop time, like the CUDA driver's
    if not early:
        p.harden_early(plan)
    try:
        p.drop(plan)
    except p.PrivilegeError as e:
        print(json.dumps({"error": e.message}))
    else:
        try:
            os.setuid(0)
            regained = True
        except PermissionError:
            regained = False
        print(json.dumps({"regained": regained, "threads": len(p.thread_creds()), "ids": os.getresuid()}))
    stop.set()
""")


def _child(order: str) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-c", _CHILD, order], check=True, capture_output=True, text=True, timeout=60)
    return dict(json.loads(run.stdout))


@as_root
def test_worker_4901_drop_covers_threads_started_after_harden_early() -> None:
    out = _child("early")
    assert out == {"regained": False, "threads": 2, "ids": [NOBODY] * 3}


@as_root
def test_worker_4901_verify_catches_a_thread_without_no_new_privs() -> None:
    """no_new_privs is per thread: a thread older than harden_early() lacks it, and verify() says so."""
    out = _child("late")
    assert "privilege drop incomplete on thread" in out["error"] and "no_new_privs not set" in out["error"]


_HANDED_CAPS = textwrap.dedent("""
    import json, os, threading
    from worker_orcd import privileges as p
    NET_BIND = 1 << 10
    # What systemd's AmbientCapabilities=CAP_NET_BIND_SERVICE gives an unprivileged service.
    p._prctl(p.PR_SET_KEEPCAPS, 1, what="keep caps")
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    p._capset(NET_BIND, NET_BIND, NET_BIND)
    p._prctl(p.PR_CAP_AMBIENT, 2, 10, what="raise ambient")  # PR_CAP_AMBIENT_RAISE
    before = p.thread_creds()[0]
    plan = p.decide(None, False, os.geteuid())
    p.harden_early(plan)
    stop = threading.Event()
    threading.Thread(target=stop.wait).start()  # started after harden_early, as the device's threads are
    p.drop(plan)
    after = p.thread_creds()
    stop.set()
    print(json.dumps({"before": [before.cap_eff, before.cap_amb], "plan_target": plan.target,
                      "after": [[t.cap_inh, t.cap_prm, t.cap_eff, t.cap_amb, t.no_new_privs] for t in after]}))
""")


@as_root
def test_worker_4903_unprivileged_process_sheds_handed_capabilities() -> None:
    run = subprocess.run([sys.executable, "-c", _HANDED_CAPS], check=True, capture_output=True, text=True, timeout=60)
    out = json.loads(run.stdout)
    assert out["before"] == [1 << 10, 1 << 10] and out["plan_target"] is None
    assert out["after"] == [[0, 0, 0, 0, True]] * 2  # both threads


def test_worker_4901_triton_cache_dir_follows_tritons_rules() -> None:
    from worker_orcd.serve import triton_cache_dir

    assert triton_cache_dir({"TRITON_CACHE_DIR": "/c", "TRITON_HOME": "/h"}) == Path("/c")
    assert triton_cache_dir({"TRITON_HOME": "/h", "HOME": "/home/x"}) == Path("/h/.triton/cache")
    assert triton_cache_dir({"HOME": "/home/x"}) == Path("/home/x/.triton/cache")


_AFTER_DROP = textwrap.dedent("""
    import sys
    import os
    from pathlib import Path
    from worker_orcd import privileges as p, serve
    from worker_orcd.auth import TokenFile
    from worker_orcd.config import load_config
    d, device, model_root = Path(sys.argv[1]), sys.argv[2], sys.argv[3] or sys.argv[1]
    config = load_config({"worker_id": "w", "device": device, "model_root": model_root,
                          "api_token_file": str(d / "worker-token"), "state_dir": sys.argv[4] or None}, env={})
    serve.use_state_dir(config, os.environ)
    tokens = TokenFile(config.api_token_file)
    tokens.load()
    plan = p.DropPlan(p.lookup_account("nobody"))
    p.harden_early(plan)
    try:
        serve._drop_privileges(plan, config, tokens)
    except p.PrivilegeError as e:
        print(e.message)
    else:
        print("ok")
""")


def _after_drop(nobody_dir: Path, device: str, model_root: str = "", triton_home: str = "", state_dir: str = "") -> str:
    _token_file(nobody_dir / "worker-token", NOBODY)
    env = {**os.environ, "TRITON_HOME": triton_home or str(nobody_dir)}
    env.pop("TRITON_CACHE_DIR", None)
    run = subprocess.run([sys.executable, "-c", _AFTER_DROP, str(nobody_dir), device, model_root, state_dir], check=True,
                         capture_output=True, text=True, timeout=60, env=env)
    return run.stdout.strip()


@as_root
def test_worker_4901_gpu_kernel_cache_must_be_writable_after_drop(nobody_dir: Path) -> None:
    """On CUDA, Triton compiles at the first load, after the drop: an unwritable cache is refused up front."""
    assert _after_drop(nobody_dir, "cuda") == "ok"
    out = _after_drop(nobody_dir, "cuda", triton_home="/root/.worker-orcd-test-triton")
    assert out.startswith("/root must be writable by user nobody (uid 65534, gid 65534) after the privilege drop")
    assert "TRITON_HOME" in out


@as_root
def test_worker_4901_state_dir_holds_the_kernel_cache_and_must_be_writable_after_drop(nobody_dir: Path) -> None:
    """Issue 13: with --state-dir the cache is DIR/triton-cache, and the drop check looks there, not at TRITON_HOME."""
    assert _after_drop(nobody_dir, "cuda", triton_home="/root/.worker-orcd-test-triton", state_dir=str(nobody_dir)) == "ok"
    out = _after_drop(nobody_dir, "cuda", state_dir="/root")
    assert out.startswith("/root must be writable by user nobody (uid 65534, gid 65534) after the privilege drop"), out
    assert "--state-dir" in out


@as_root
def test_worker_4901_model_root_must_be_readable_after_drop(nobody_dir: Path) -> None:
    """Models are read only after the drop: a model root the user cannot read is refused at startup."""
    assert _after_drop(nobody_dir, "cpu", model_root="/root/.cache") == (
        "/root/.cache must be readable by user nobody (uid 65534, gid 65534) after the privilege drop")
    assert _after_drop(nobody_dir, "cpu", model_root="/nonexistent/models") == "ok"  # left to the loader


# --- the real worker as root with --user nobody ----------------------------------------------


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="worker-orcd-priv-", dir="/tmp"))  # pytest's tmp is root-only
    os.chown(d, NOBODY, NOBODY)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _token_file(path: Path, owner: int) -> str:
    token = secrets.token_hex(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    os.chown(path, owner, owner)
    return token


@as_root
def test_worker_4901_drop_as_seen_in_proc(nobody_dir: Path, tmp_path: Path) -> None:
    """Uid/Gid all nobody, no groups, NoNewPrivs 1, every capability set empty, root not regained."""
    token = _token_file(nobody_dir / "worker-token", NOBODY)
    port = _free_port()
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*SERVE, "--worker-id", "w-priv", "--device", "cpu", "--user", "nobody", "--port", str(port),
             "--api-token-file", str(nobody_dir / "worker-token"), "--upload-dir", str(nobody_dir)],
            stdout=fh, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker never answered /health"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        main = parse_status(proc.pid, status)
        threads = thread_creds(Path(f"/proc/{proc.pid}"))
        ready = httpx.get(f"http://127.0.0.1:{port}/worker/ready", headers={"Authorization": f"Bearer {token}"})
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()[-3000:]
    lines = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert lines["Groups"].strip() == ""
    assert main.uids == (NOBODY,) * 4 and main.gids == (NOBODY,) * 4 and main.groups == ()
    assert main.no_new_privs
    assert (main.cap_inh, main.cap_prm, main.cap_eff, main.cap_amb, main.cap_bnd) == (0, 0, 0, 0, 0)
    assert len(threads) > 1  # torch/executor threads exist: the drop had to reach them too
    for t in threads:
        assert t.uids == (NOBODY,) * 4 and t.gids == (NOBODY,) * 4 and t.groups == () and t.no_new_privs, t
        assert (t.cap_inh, t.cap_prm, t.cap_eff, t.cap_amb) == (0, 0, 0, 0), t
    assert ready.status_code == 200
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
    assert events.index("device_open") < events.index("privileges_dropped") < events.index("listening")


@as_root
def test_worker_4901_token_file_unreadable_after_drop_refused(nobody_dir: Path, tmp_path: Path) -> None:
    """Root could read it at startup, nobody cannot: refuse now rather than fail the first SIGHUP."""
    token_file = nobody_dir / "worker-token"
    _token_file(token_file, 0)  # root-owned 0600
    run = subprocess.run(
        [*SERVE, "--worker-id", "w", "--device", "cpu", "--user", "nobody", "--port", str(_free_port()),
         "--api-token-file", str(token_file)], check=False, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    (failed,) = [json.loads(line) for line in run.stderr.splitlines() if '"startup_failed"' in line]
    assert "after the privilege drop" in failed["human"] and f"chown nobody {token_file}" in failed["human"]


@pytest.mark.gpu
@as_root
def test_worker_4901_gpu_drop_then_load_and_serve(nobody_dir: Path, tmp_path: Path, serve_model_path: Path) -> None:
    """Real GPU: the device is opened as root, then the model is read, loaded (Triton compiles) and served as nobody."""
    from worker_orcd.http.sse import parse

    # Triton compiles its launcher against this Python's headers after the drop (deploy/README.md).
    private = [p for p in (Path(sys.base_prefix), *Path(sys.base_prefix).parents) if not p.stat().st_mode & 0o001]
    if private:
        pytest.skip(f"{private[0]} is not searchable by others: nobody cannot use this Python after the drop")

    models = nobody_dir / "models"
    models.mkdir()
    try:
        os.link(serve_model_path, models / serve_model_path.name)  # same inode, mode 0644: readable by nobody
    except OSError:
        shutil.copyfile(serve_model_path, models / serve_model_path.name)
    os.chown(models, NOBODY, NOBODY)
    token = _token_file(nobody_dir / "worker-token", NOBODY)
    port = _free_port()
    log = tmp_path / "worker.log"
    env = {**os.environ, "TRITON_HOME": str(nobody_dir)}
    env.pop("TRITON_CACHE_DIR", None)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*SERVE, "--worker-id", "w-gpu-priv", "--device", "cuda", "--user", "nobody", "--port", str(port),
             "--model", serve_model_path.name, "--model-root", str(models), "--api-token-file",
             str(nobody_dir / "worker-token"), "--max-tokens-out", "16"],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker never became ready"
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("state") == "ready":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        r = httpx.post(f"{url}/worker/execute", headers={"Authorization": f"Bearer {token}"}, timeout=120,
                       json={"prompt": "def fibonacci(n):", "params": {"max_tokens": 8}})
        threads = thread_creds(Path(f"/proc/{proc.pid}"))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    assert code == 0, log.read_text()[-3000:]
    events = parse(r.text)
    assert r.status_code == 200 and events[-1][0] == "end" and events[-1][1]["tokens_out"] > 0, r.text[-2000:]
    for t in threads:
        assert set(t.uids) == {NOBODY} and t.groups == () and t.no_new_privs and not (t.cap_prm | t.cap_eff), t
