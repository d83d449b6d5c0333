"""Deployment artefacts (SPEC 4900-4903, 4910-4913, 4920-4921, 4962-4963): deploy/.

The systemd units go through ``systemd-analyze verify`` (skipped only where the
tool is absent). verify insists that ExecStart's binary exists, so it runs on a
copy whose ExecStart points at /bin/true; every other line is the real unit. On
systemd < 254, RestartSteps= / RestartMaxDelaySec= are unknown and ignored
(backoff then stays at RestartSec=1, the circuit breaker still holds): those two
warnings, and only those, are tolerated there. The Containerfile and the
AppArmor profile can only be linted textually here (``apparmor_parser`` is run
when installed).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from worker_orcd.config import CREDENTIAL_NAME, DEFAULT_TOKEN_FILE, load_config
from worker_orcd.serve import add_serve_arguments, config_from_args
from ci_gate import need

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT, TEMPLATE = DEPLOY / "worker-orcd.service", DEPLOY / "worker-orcd@.service"
BINARY = "/opt/worker-orcd/bin/worker-orcd"
NEW_RESTART_KEYS = ("RestartSteps", "RestartMaxDelaySec")  # systemd >= 254
NVIDIA_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (keys may repeat), continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path.name}: setting outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: expected one value, got {values}"
    return values[0]


# --- systemd-analyze verify ------------------------------------------------------------------


def _systemd_version() -> int:
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run([SYSTEMD_ANALYZE, "--version"], check=True, capture_output=True, text=True).stdout
    m = re.match(r"systemd (\d+)", out)
    assert m, out
    return int(m.group(1))


def _verify(unit: Path, tmp: Path, name: str | None = None, extra: str = "") -> list[str]:
    """verify a copy whose ExecStart binary exists; the remaining problem lines."""
    text = unit.read_text()
    assert text.count(BINARY) == 1, "the unit's ExecStart binary moved: update this test"
    copy = tmp / (name or unit.name)
    copy.write_text(text.replace(BINARY, "/bin/true") + extra)
    assert SYSTEMD_ANALYZE is not None
    run = subprocess.run([SYSTEMD_ANALYZE, "verify", str(copy)], check=False, capture_output=True, text=True,
                         timeout=60, cwd=tmp)
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.strip()]
    if _systemd_version() < 254:
        tolerated = tuple(f"Unknown key '{k}' in section [Service], ignoring." for k in NEW_RESTART_KEYS)
        lines = [ln for ln in lines if not ln.endswith(tolerated)]
    return lines + ([f"exit status {run.returncode}"] if run.returncode else [])


@pytest.mark.parametrize(("unit", "name"), [
    (UNIT, None), (TEMPLATE, None), (TEMPLATE, "worker-orcd@3.service"),
])
def test_worker_4920_units_pass_systemd_analyze_verify(tmp_path: Path, unit: Path, name: str | None) -> None:
    need(SYSTEMD_ANALYZE is not None, "systemd-analyze is not installed (apt install systemd)")
    assert _verify(unit, tmp_path, name) == []


def test_worker_4920_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above is only worth something if verify complains here."""
    need(SYSTEMD_ANALYZE is not None, "systemd-analyze is not installed (apt install systemd)")
    problems = _verify(UNIT, tmp_path, extra="[Service]\nProtectSytem=strict\nRestartSec=soon\n")
    assert any("ProtectSytem" in p for p in problems) and any("soon" in p for p in problems), problems


# --- what the units promise ------------------------------------------------------------------


@pytest.mark.parametrize("path", [UNIT, TEMPLATE])
def test_worker_4962_restart_backoff_and_circuit_breaker(path: Path) -> None:
    u = parse_unit(path)
    assert one(u, "Unit", "StartLimitBurst") == "5" and one(u, "Unit", "StartLimitIntervalSec") == "300"
    assert one(u, "Service", "Restart") == "on-failure" and one(u, "Service", "RestartSec") == "1"
    assert one(u, "Service", "RestartSteps") == "5" and one(u, "Service", "RestartMaxDelaySec") == "60"
    assert one(u, "Service", "RestartPreventExitStatus") == "2"  # a config error does not heal on restart
    argv = shlex.split(one(u, "Service", "ExecStart"))
    shutdown = float(argv[argv.index("--shutdown-timeout-sec") + 1])
    stop = float(one(u, "Service", "TimeoutStopSec"))
    assert shutdown < stop <= shutdown + 30  # the worker's own drain finishes before systemd kills it
    assert one(u, "Service", "KillSignal") == "SIGTERM"


@pytest.mark.parametrize("path", [UNIT, TEMPLATE])
def test_worker_4903_4913_identity_and_credential(path: Path) -> None:
    u = parse_unit(path)["Service"]
    assert u["DynamicUser"] == ["yes"] and "User" not in u
    assert u["LoadCredential"] == [f"{CREDENTIAL_NAME}:{DEFAULT_TOKEN_FILE}"]
    exec_start = u["ExecStart"][0]
    assert "--api-token-file" not in exec_start and "--user" not in exec_start and "--allow-root" not in exec_start
    assert not any("TOKEN" in e and "FILE" not in e for e in u.get("Environment", []))
    assert "WORKER_LOG_LEVEL=info" in u["Environment"]


@pytest.mark.parametrize("path", [UNIT, TEMPLATE])
def test_worker_4920_sandbox(path: Path) -> None:
    u = parse_unit(path)["Service"]
    expected = {
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "PrivateDevices": "no", "DevicePolicy": "closed", "ReadOnlyPaths": "/var/lib/worker-orcd/models",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service", "UMask": "0077",
    }
    assert {k: u.get(k) for k in expected} == {k: [v] for k, v in expected.items()}
    allowed = dict(v.split() for v in u["DeviceAllow"])
    gpu = "/dev/nvidia%i" if "@" in path.name else "/dev/nvidia0"
    assert allowed == {gpu: "rw", **{node: "rw" for node in NVIDIA_NODES}}


def test_worker_4921_template_isolates_one_gpu_per_instance() -> None:
    u = parse_unit(TEMPLATE)["Service"]
    env = " ".join(u["Environment"])
    assert "CUDA_VISIBLE_DEVICES=%i" in env and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in env
    argv = shlex.split(u["ExecStart"][0])
    assert argv[argv.index("--gpu-device") + 1] == "0"  # the one visible device
    assert "gpu%i" in argv[argv.index("--config") + 1] and "%i" in u["CacheDirectory"][0]


@pytest.mark.parametrize("path", [UNIT, TEMPLATE])
def test_state_directory_keeps_the_kernel_cache_apart_from_the_models(path: Path) -> None:
    """Issue 13: StateDirectory= gives $STATE_DIRECTORY, the default --state-dir (Triton's cache survives restarts).

    Not /var/lib/worker-orcd itself: with DynamicUser= systemd would move and chown the models' parent."""
    u = parse_unit(path)["Service"]
    (state,) = u["StateDirectory"]
    assert state.startswith("worker-orcd/state") and ("%i" in state) == ("@" in path.name)
    models = one(parse_unit(path), "Service", "ReadOnlyPaths")
    state_path = "/var/lib/" + state.replace("%i", "0")
    assert not models.startswith(state_path + "/") and not state_path.startswith(models)
    assert "--state-dir" not in u["ExecStart"][0]  # systemd's $STATE_DIRECTORY is the default
    rules = apparmor_rules()
    assert "owner @{WORKER_STATE}/** rwkm," in rules
    config = load_config({"worker_id": "w"}, env={"STATE_DIRECTORY": state_path})
    assert config.triton_cache_dir == Path(state_path) / "triton-cache"


@pytest.mark.parametrize("path", [UNIT, TEMPLATE])
def test_worker_4980_exec_start_flags_are_real_and_valid(path: Path, tmp_path: Path) -> None:
    """ExecStart's flags exist in `worker-orcd serve` and validate together with the example config."""
    import argparse

    argv = shlex.split(one(parse_unit(path), "Service", "ExecStart").replace("%H", "host1").replace("%i", "0"))
    assert argv[0] == BINARY and argv[1] == "serve"
    conf_at = argv.index("--config") + 1
    example = tmp_path / "worker.json"
    example.write_text(json.dumps({**json.loads((DEPLOY / "worker.example.json").read_text()), "bind": "127.0.0.1:8002"}))
    argv[conf_at] = str(example)
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(argv[2:]), env={"CREDENTIALS_DIRECTORY": "/run/credentials/x"})
    assert config.device == "cuda" and config.worker_id.startswith("host1-gpu0")
    assert str(config.api_token_file) == f"/run/credentials/x/{CREDENTIAL_NAME}"
    assert config.model_root == Path("/var/lib/worker-orcd/models")
    assert load_config({"worker_id": "w"}, env={}, config_file=DEPLOY / "worker.example.json").callback_url


# --- Containerfile ---------------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Containerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def test_worker_4902_containerfile_runs_as_non_root() -> None:
    steps = containerfile()
    users = [args for instr, args in steps if instr == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) >= 1000
    assert [i for i, _ in steps].index("USER") > max(i for i, (s, _) in enumerate(steps) if s == "RUN")


def test_worker_4910_containerfile_bakes_in_no_secret() -> None:
    steps = containerfile()
    for instr, args in steps:
        if instr in ("ENV", "ARG"):
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args):
                if re.search(r"TOKEN|SECRET|PASSWORD|PRIVATE|KEY", key.upper()):
                    assert key.endswith("_FILE") and value.startswith("/run/secrets/"), f"{instr} {key}={value}"
        if instr in ("COPY", "ADD"):
            sources = args.split()[:-1]
            assert "." not in sources and not any(re.search(r"token|secret|\.venv|\.gguf|\.pem", s) for s in sources)
    entry = json.loads(next(args for instr, args in steps if instr == "ENTRYPOINT"))
    assert entry == [BINARY, "serve"]
    health = next(args for instr, args in steps if instr == "HEALTHCHECK")
    assert "/health" in health


# --- AppArmor --------------------------------------------------------------------------------


def apparmor_rules() -> list[str]:
    text = (DEPLOY / "apparmor" / "worker-orcd").read_text()
    body = re.search(r"^profile worker-orcd [^\n]*\{$(.*)^\}", text, re.DOTALL | re.MULTILINE)
    assert body, "no `profile worker-orcd ... { }` block"
    rules = [ln.strip() for ln in body.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    for rule in rules:
        assert rule.startswith("include ") or rule.endswith(","), f"rule without a trailing comma: {rule}"
    return rules


def _perms(rules: list[str], path: str) -> list[str]:
    return [r.rsplit(None, 1)[1].rstrip(",") for r in rules if r.split()[0] == path]


def test_worker_4920_apparmor_profile_limits_files_and_network() -> None:
    rules = apparmor_rules()
    assert _perms(rules, "@{WORKER_MODELS}/**") == ["r"] and "deny @{WORKER_MODELS}/** wl," in rules
    for token_path in ("/etc/llorch/worker-token", "/run/credentials/worker-orcd{,@*}.service/worker-token",
                       "/run/secrets/worker-token"):
        assert _perms(rules, token_path) == ["r"], token_path
    for node in ("/dev/nvidia[0-9]*", *NVIDIA_NODES):
        assert _perms(rules, node) == ["rw"], node
    assert "network inet stream," in rules and "network inet6 stream," in rules
    assert not any(r.startswith("network") and r.rstrip(",").split()[1:] in ([], ["raw"], ["packet"]) for r in rules)
    caps = {r.split()[1].rstrip(",") for r in rules if r.startswith("capability")}
    assert caps == {"setuid", "setgid", "setpcap"}  # only what the one-way drop needs
    path_rules = [r for r in rules if r.startswith(("/", "@{", "owner /", "owner @{"))]
    writable = [r for r in path_rules if "w" in r.rsplit(None, 1)[1]]
    assert all(re.search(r"/tmp/|/var/tmp/|WORKER_CACHE|WORKER_STATE|/dev/nvidia", r) for r in writable), writable
    assert not any(r.split()[0] in ("/**", "/", "@{HOME}/**") for r in path_rules)


def _compile(profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["apparmor_parser", "--skip-kernel-load", "--skip-cache", "--skip-read-cache", str(profile)],
                          check=False, capture_output=True, text=True, timeout=60)


def test_worker_4920_apparmor_profile_compiles(tmp_path: Path) -> None:
    need(shutil.which("apparmor_parser") is not None, "apparmor_parser is not installed (apt install apparmor)")
    run = _compile(DEPLOY / "apparmor" / "worker-orcd")
    assert run.returncode == 0, run.stderr
    broken = tmp_path / "worker-orcd"  # and the parser does reject a malformed copy
    broken.write_text((DEPLOY / "apparmor" / "worker-orcd").read_text().replace("/dev/nvidiactl rw,", "/dev/nvidiactl rw"))
    assert _compile(broken).returncode != 0
