"""Configuration: precedence, the SPEC's key aliases, and one clear line per bad value (SPEC 4980-4991)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker_orcd.config import ConfigError, WorkerConfig, load_config, parse_bind
from worker_orcd.serve import main as serve_main

BASE: dict[str, Any] = {"worker_id": "w1"}


def cfg(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None, file: Path | None = None) -> WorkerConfig:
    return load_config({**BASE, **(flags or {})}, env=env or {}, config_file=file)


def error_of(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None, file: Path | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config({**BASE, **(flags or {})} if flags is not None or file is None else {}, env=env or {}, config_file=file)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_worker_4990_defaults() -> None:
    c = cfg()
    assert (c.host, c.listen_port) == ("127.0.0.1", 8001)
    assert c.device == "cuda" and not c.dev_mode  # SPEC "GPU only": CPU is never the default
    assert c.gpu_device == 0 and c.log_level == "info"
    assert c.api_token_file == Path("/etc/llorch/worker-token")
    assert (c.max_prompt_chars, c.max_tokens_out, c.inference_timeout_sec, c.shutdown_timeout_sec) == (100_000, 4096, 300, 30)


def test_worker_4980_flags_beat_file_beat_env(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"worker_id": "from-file", "gpu_device": 2, "log_level": "debug"}))
    env = {"WORKER_GPU_DEVICE": "1", "WORKER_LOG_LEVEL": "warning", "WORKER_BIND_ADDR": "127.0.0.2:9000"}
    c = load_config({"worker_id": "from-flag"}, env=env, config_file=file)
    assert c.worker_id == "from-flag"  # flag > file
    assert c.gpu_device == 2 and c.log_level == "debug"  # file > env
    assert (c.host, c.listen_port) == ("127.0.0.2", 9000)  # env > default


def test_worker_4981_spec_key_aliases_in_config_file(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({
        "worker_id": "w", "model_path": "m.gguf", "rpc_port": 9100, "readiness_callback_url": "http://pm:7000/",
        "max_tokens": 100, "max_prompt_len": 500, "execution_timeout_ms": 1500, "slots_total": 1,
    }))
    c = load_config({}, env={}, config_file=file)
    assert (c.model, c.listen_port, c.callback_url) == ("m.gguf", 9100, "http://pm:7000")
    assert (c.max_tokens_out, c.max_prompt_chars, c.inference_timeout_sec) == (100, 500, 1.5)
    assert c.max_batch == 1  # slots_total is --max-batch


def test_worker_4990_port_flag_overrides_bind_port() -> None:
    c = cfg({"bind": "0.0.0.0:7000", "port": "7100"})
    assert (c.host, c.listen_port) == ("0.0.0.0", 7100)


def test_worker_4913_credentials_directory_names_the_token_file() -> None:
    c = cfg(env={"CREDENTIALS_DIRECTORY": "/run/credentials/worker-orcd.service"})
    assert c.api_token_file == Path("/run/credentials/worker-orcd.service/worker-token")
    c = cfg(env={"CREDENTIALS_DIRECTORY": "/run/c", "WORKER_API_TOKEN_FILE": "/x/token"})
    assert c.api_token_file == Path("/x/token")  # the explicit variable wins


def test_state_dir_from_flag_file_or_systemd_state_directory(tmp_path: Path) -> None:
    """Issue 13: --state-dir > config file > $STATE_DIRECTORY (systemd StateDirectory=) > none (today's Triton default)."""
    assert cfg().state_dir is None and cfg().triton_cache_dir is None
    c = cfg(env={"STATE_DIRECTORY": "/var/lib/worker-orcd/state:/var/lib/other"})
    assert c.state_dir == Path("/var/lib/worker-orcd/state")  # several StateDirectory= entries: the first
    assert c.triton_cache_dir == Path("/var/lib/worker-orcd/state/triton-cache")
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"state_dir": str(tmp_path)}))
    assert cfg(env={"STATE_DIRECTORY": "/s"}, file=file).state_dir == tmp_path
    assert cfg({"state_dir": "/flag"}, env={"STATE_DIRECTORY": "/s"}, file=file).state_dir == Path("/flag")


def test_state_dir_bad_values_name_the_source(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    assert error_of({"state_dir": "relative/dir"}) == (
        "config: state_dir (--state-dir): must be an absolute directory path (got 'relative/dir')")
    assert error_of({"state_dir": str(tmp_path / "f")}).startswith(
        "config: state_dir (--state-dir): exists and is not a directory")
    assert error_of({}, env={"STATE_DIRECTORY": "state"}).startswith(
        "config: state_dir (STATE_DIRECTORY): must be an absolute directory path")


def test_state_dir_points_triton_cache_there_unless_explicitly_set(tmp_path: Path) -> None:
    from worker_orcd.serve import use_state_dir

    env: dict[str, str] = {}
    assert use_state_dir(cfg(), env) is None and env == {}  # unset: Triton's own default, as before
    assert use_state_dir(cfg({"state_dir": str(tmp_path)}), env) == tmp_path / "triton-cache"
    assert env == {"TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    mine = {"TRITON_CACHE_DIR": "/elsewhere"}
    assert use_state_dir(cfg({"state_dir": str(tmp_path)}), mine) is None and mine == {"TRITON_CACHE_DIR": "/elsewhere"}


def test_worker_4910_token_never_from_env_value() -> None:
    # There is no variable carrying the token itself; an unknown setting is refused, not read.
    assert "api_token" not in WorkerConfig.model_fields
    assert "unknown setting" in error_of({"api_token": "secret"})
    msg = error_of(env={"WORKER_API_TOKEN": "secret-value-0123456789"})  # refused, not silently ignored
    assert "WORKER_API_TOKEN is set" in msg and "secret-value" not in msg


def test_worker_4901_user_and_allow_root(tmp_path: Path) -> None:
    assert (cfg().user, cfg().allow_root) == (None, False)
    assert cfg({"user": "worker-orcd"}).user == "worker-orcd"
    assert cfg({"user": "65534"}).user == "65534"
    assert "user (--user): must be a user name" in error_of({"user": "a b"})
    assert "user (--user): must be a user name" in error_of({"user": "x" * 40})
    assert "allow_root and user exclude each other" in error_of({"user": "nobody", "allow_root": True})
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"worker_id": "w", "user": "nobody"}))
    assert load_config({}, env={}, config_file=conf).user == "nobody"


@pytest.mark.parametrize(
    ("flags", "field", "rule"),
    [
        ({"port": "70000"}, "port (--port)", "less than or equal to 65535"),
        ({"port": "http"}, "port (--port)", "valid integer"),
        ({"gpu_device": "-1"}, "gpu_device (--gpu-device)", "greater than or equal to 0"),
        ({"device": "tpu"}, "device (--device)", "'cuda' or 'cpu'"),
        ({"worker_id": "has space"}, "worker_id (--worker-id)", "letters, digits"),
        ({"worker_id": None}, "worker_id", "required"),
        ({"callback_url": "ftp://x"}, "callback_url (--callback-url)", "http:// or https://"),
        ({"callback_url": "http://u:p@x"}, "callback_url (--callback-url)", "credentials"),
        ({"expected_sha256": "abc"}, "expected_sha256 (--expected-sha256)", "pattern"),
        ({"max_prompt_chars": "0"}, "max_prompt_chars (--max-prompt-chars)", "greater than or equal to 1"),
        ({"max_tokens_out": "1.5"}, "max_tokens_out (--max-tokens-out)", "valid integer"),
        ({"inference_timeout_sec": "0"}, "inference_timeout_sec (--inference-timeout-sec)", "greater than 0"),
        ({"shutdown_timeout_sec": "-3"}, "shutdown_timeout_sec (--shutdown-timeout-sec)", "greater than 0"),
        ({"kv_cache_size_mb": "0"}, "kv_cache_size_mb (--kv-cache-size-mb)", "greater than or equal to 1"),
        ({"log_level": "loud"}, "log_level (--log-level)", "'debug', 'info', 'warning' or 'error'"),
        ({"bind": "1.2.3.4:99999"}, "bind (--bind)", "0..65535"),
        ({"bind": "::1:80"}, "bind (--bind)", "brackets"),
        ({"bind": "bad host!:80"}, "bind (--bind)", "not a hostname"),
        ({"max_model_size_bytes": str(200 * 10**9)}, "max_model_size_bytes (--max-model-size-bytes)", "less than or equal"),
    ],
)
def test_worker_4983_invalid_value_names_field_and_rule(flags: dict[str, Any], field: str, rule: str) -> None:
    msg = error_of(flags)
    assert msg.startswith(f"config: {field}: "), msg
    assert rule in msg, msg


def test_worker_4983_env_value_error_names_the_variable() -> None:
    msg = error_of({}, env={"WORKER_GPU_DEVICE": "gpu0"})
    assert msg.startswith("config: gpu_device (WORKER_GPU_DEVICE): ")
    msg = error_of({}, env={"WORKER_BIND_ADDR": "localhost:0x50"})
    assert msg.startswith("config: bind (WORKER_BIND_ADDR): ")


def test_worker_4983_config_file_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    assert "file not found" in error_of(None, file=f)
    f.write_text("{not json")
    assert "not valid JSON" in error_of(None, file=f)
    f.write_text("[1, 2]")
    assert "must be a JSON object" in error_of(None, file=f)
    f.write_text(json.dumps({"worker_id": "w", "colour": "blue"}))
    assert error_of(None, file=f) == "config: colour (config file): unknown setting"
    f.write_text(json.dumps({"worker_id": "w", "model": "a", "model_path": "b"}))
    assert "given twice" in error_of(None, file=f)
    f.write_text(json.dumps({"worker_id": "w", "slots_total": 0}))
    assert error_of(None, file=f).startswith("config: max_batch (config file): Input should be greater than or equal to 1")
    f.write_text(json.dumps({"worker_id": "w", "max_queue": -1}))
    assert error_of(None, file=f).startswith("config: max_queue (config file): Input should be greater than or equal to 0")
    f.write_text(json.dumps({"worker_id": "w", "mixed_step_tokens": 0}))
    assert error_of(None, file=f).startswith("config: mixed_step_tokens (config file): Input should be greater than or equal to 1")
    assert cfg({"mixed_step_tokens": "192"}).mixed_step_tokens == 192  # --mixed-step-tokens
    assert cfg({"seal_check_interval_ms": "0"}).seal_check_interval_ms == 0  # --seal-check-interval-ms
    assert cfg({"seal_check_interval_ms": "12.5"}).seal_check_interval_ms == 12.5
    assert cfg().event_loop == "asyncio" and cfg({"event_loop": "uvloop"}).event_loop == "uvloop"  # --event-loop
    f.write_text(json.dumps({"worker_id": "w", "event_loop": "trio"}))
    assert error_of(None, file=f).startswith("config: event_loop (config file): Input should be 'uvloop' or 'asyncio'")
    f.write_text(json.dumps({"worker_id": "w", "seal_check_interval_ms": -1}))
    assert error_of(None, file=f).startswith("config: seal_check_interval_ms (config file): Input should be greater than or equal to 0")
    f.write_text(json.dumps({"worker_id": "w", "port": "8001"}))
    assert cfg(file=f).listen_port == 8001  # lax: a quoted number is still a number


def test_worker_4983_signature_requirement_needs_key() -> None:
    assert "require_signature needs model_public_key" in error_of({"require_signature": True})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:8001", ("127.0.0.1", 8001)), ("localhost", ("localhost", 8001)), ("[::1]:9000", ("::1", 9000)),
     ("0.0.0.0:0", ("0.0.0.0", 0)), ("worker-1.example:80", ("worker-1.example", 80))],
)
def test_worker_4991_bind_formats(text: str, expected: tuple[str, int]) -> None:
    assert parse_bind(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "[::1", "[zz]:80", "host:", "host:-1", "a b:1"])
def test_worker_4991_bad_bind_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bind(text)


def test_worker_4983_cli_bad_value_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--worker-id", "w", "--port", "99999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["worker-orcd: error: config: port (--port): Input should be less than or equal to 65535 (got '99999')"]


def test_worker_4983_cli_missing_worker_id_exits_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert serve_main([]) == 2
    assert capsys.readouterr().err.strip() == "worker-orcd: error: config: worker_id: required (--worker-id)"


@pytest.mark.parametrize("value", ["dense", "quantized", "quantized-half2"])
def test_resident_weights_values(value: str) -> None:
    """Every residency the engine has is a serve option; the CUDA plan counts both quantized ones alike."""
    from worker_orcd.engine.api import RESIDENT_WEIGHTS
    from worker_orcd.engine.vram_budget import RESIDENCIES

    assert load_config({"worker_id": "w", "resident_weights": value}, env={}).resident_weights == value
    assert value in RESIDENT_WEIGHTS and value in RESIDENCIES


def test_resident_weights_unknown_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        load_config({"worker_id": "w", "resident_weights": "half2"}, env={})
    assert "resident_weights" in str(e.value)
