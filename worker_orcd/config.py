"""Daemon configuration (SPEC 4980-4991): flags > JSON config file > WORKER_* env > defaults.

Every value from every source goes through one pydantic model, so a bad value
is reported the same way wherever it came from: one line naming the field,
where it was set and the rule it broke (the CLI turns that into exit code 2).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .engine.tp_plan import MAX_TP_DEGREE, MIN_SECRET_BYTES
from .gguf.constants import Limits
from .sources import DEFAULT_MODEL_ROOT

DEFAULT_BIND = "127.0.0.1:8001"  # SPEC 4990: loopback by default (4922)
DEFAULT_TOKEN_FILE = Path("/etc/llorch/worker-token")
CREDENTIAL_NAME = "worker-token"  # systemd LoadCredential= name under $CREDENTIALS_DIRECTORY
SEAL_CHECK_INTERVAL_MS = 100.0  # see seal_check_interval_ms (RESULTS, tenth session)
TRITON_CACHE_SUBDIR = "triton-cache"  # under --state-dir: compiled kernels survive restarts (issue 13)
# Defaults systemd hands over in the environment, beside the four SPEC 4990 variables: field -> variable.
SYSTEMD_DIRS: dict[str, str] = {"api_token_file": "CREDENTIALS_DIRECTORY", "state_dir": "STATE_DIRECTORY"}
MAX_MODEL_SIZE = Limits.max_file_size
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}|[0-9]{1,10}")  # a POSIX user name, or a numeric uid

# SPEC 4981/4982 spell some keys differently from the CLI; a config file may use either.
JSON_ALIASES: dict[str, str] = {
    "model_path": "model",
    "rpc_port": "port",
    "readiness_callback_url": "callback_url",
    "max_tokens": "max_tokens_out",
    "max_prompt_len": "max_prompt_chars",
    "slots_total": "max_batch",
}

# The four environment variables of SPEC 4990 (never the token itself: 4910).
ENV_VARS: dict[str, str] = {
    "WORKER_API_TOKEN_FILE": "api_token_file",
    "WORKER_BIND_ADDR": "bind",
    "WORKER_GPU_DEVICE": "gpu_device",
    "WORKER_LOG_LEVEL": "log_level",
}
# Variables an operator might expect to carry the token itself. Refused rather than ignored: the
# operator would believe it is in use, and any process of the same user reads /proc/PID/environ.
TOKEN_VALUE_VARS = ("WORKER_API_TOKEN",)


class ConfigError(Exception):
    """One configuration problem, already phrased as the single line the operator sees."""


class WorkerConfig(BaseModel):
    """The validated configuration; see README "Configuration" for the table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    worker_id: str
    pool_id: str | None = None
    model: str | None = Field(default=None, min_length=1, max_length=4096)
    model_root: Path = DEFAULT_MODEL_ROOT
    expected_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    model_public_key: Path | None = None
    require_signature: bool = False
    device: Literal["cuda", "cpu"] = "cuda"
    gpu_device: int = Field(default=0, ge=0, le=63)
    bind: str = DEFAULT_BIND
    port: int | None = Field(default=None, ge=0, le=65535)
    callback_url: str | None = None
    advertise_url: str | None = None
    api_token_file: Path = DEFAULT_TOKEN_FILE  # see env_values() for $CREDENTIALS_DIRECTORY
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_prompt_chars: int = Field(default=100_000, ge=1, le=10_000_000)
    max_tokens_out: int = Field(default=4096, ge=1, le=1 << 20)
    max_tokens_in: int | None = Field(default=None, ge=1, le=1 << 24)
    inference_timeout_sec: float = Field(default=300.0, gt=0, le=86_400)
    shutdown_timeout_sec: float = Field(default=30.0, gt=0, le=3_600)
    kv_cache_size_mb: int | None = Field(default=None, ge=1, le=1 << 20)
    max_model_size_bytes: int = Field(default=MAX_MODEL_SIZE, ge=1, le=MAX_MODEL_SIZE)
    upload_dir: Path | None = None  # where streamed commit bodies are staged; default: the system temp dir
    # Persistent state (Triton's kernel cache); default $STATE_DIRECTORY (systemd StateDirectory=), else none.
    state_dir: Path | None = None
    ready_open: bool = False
    sse_keepalive_sec: float = Field(default=5.0, ge=0.05, le=300)
    chat_template: Path | None = None  # Jinja file replacing the model's tokenizer.chat_template (/v1/chat)
    callback_attempts: int = Field(default=6, ge=1, le=100)
    callback_timeout_sec: float = Field(default=5.0, gt=0, le=300)
    # Continuous batching (issue 8). max_batch = SPEC 4982's slots_total: jobs running at once (None: as
    # many as the KV pool holds for a typical request, capped; 1 = M0: one job, every other caller busy).
    max_batch: int | None = Field(default=None, ge=1, le=1024)
    max_queue: int = Field(default=256, ge=0, le=100_000)  # admitted jobs waiting for a slot (ignored when max_batch=1)
    prefill_chunk: int | None = Field(default=None, ge=16, le=65_536)
    mixed_step_tokens: int | None = Field(default=None, ge=1, le=65_536)  # tokens of a step that has decode rows
    # while jobs run, seal checks (a read of every resident byte beside their steps) start at most this
    # often; jobs arriving in between wait for the next one (issue 8's p99 inter-token latency)
    seal_check_interval_ms: float = Field(default=SEAL_CHECK_INTERVAL_MS, ge=0, le=60_000)
    # dense: quantized matrices dequantized once at load (fastest today); quantized: GGUF blocks stay
    # resident (about 1/3 of the VRAM for Q4_K_M; the fused kernels use ggml's dequantized values);
    # quantized-half2: the same bytes, Q4_K/Q6_K dequantized in packed fp16, in fragment order (faster decode than dense)
    resident_weights: Literal["dense", "quantized", "quantized-half2"] = "dense"
    # on: the engine (device, batching loop) runs in a child process, so its Python never waits for the
    # GIL behind the HTTP side's (issue 8); off: in this process. Tensor-parallel workers: always off.
    engine_process: Literal["on", "off"] = "on"
    # the worker's event loop: asyncio's own, or uvloop's (libuv). On an H200 (benchmarks/RESULTS.md, 13th
    # session) uvloop streamed the 0.5B at 64 clients +20 % faster in one call and 7 % slower in the next,
    # with longer engine step gaps in both: asyncio stays the default until that is understood
    event_loop: Literal["uvloop", "asyncio"] = "asyncio"
    user: str | None = None  # SPEC 4901: started as root, drop to this user after device open + bind
    # Tensor parallel (SPEC 4500-4522; README "Tensor parallel"): one process per device, rank 0 serves.
    tp_degree: int = Field(default=1, ge=1, le=MAX_TP_DEGREE)
    tp_rank: int = Field(default=0, ge=0, lt=MAX_TP_DEGREE)
    tp_group_id: str | None = None
    tp_members: str | None = Field(default=None, max_length=MAX_TP_DEGREE * 129)  # worker ids, rank order, comma-separated
    tp_master: str | None = None  # HOST:PORT of rank 0's rendezvous store
    tp_secret_file: Path | None = None  # the group's shared secret (>= 16 bytes, mode 0600)
    tp_timeout_sec: float = Field(default=60.0, ge=2, le=3_600)  # every collective; a lost peer is fatal after it
    allow_root: bool = False  # keep running as root: development/CI only, never production (4900)

    @field_validator("worker_id", "pool_id", "tp_group_id")
    @classmethod
    def _identifier(cls, v: str | None) -> str | None:
        if v is not None and not _ID.fullmatch(v):
            raise ValueError("must be 1-128 characters of letters, digits, '.', '_', ':', '-', starting with a letter or digit")
        return v

    @field_validator("model")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and "\0" in v:
            raise ValueError("must not contain a NUL byte")
        return v

    @field_validator("callback_url", "advertise_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry a query, fragment or credentials")
        return v.rstrip("/")

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        try:
            text = v.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the file ({e.strerror or e})") from None
        if len(text) > 1 << 20:
            raise ValueError("larger than 1 MiB")
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        return v

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        if "\0" in str(v) or not v.is_absolute():
            raise ValueError("must be an absolute directory path")
        if v.exists() and not v.is_dir():
            raise ValueError("exists and is not a directory")
        return v

    @property
    def triton_cache_dir(self) -> Path | None:
        """Where compiled Triton kernels go with a state dir; None leaves Triton's own default."""
        return self.state_dir / TRITON_CACHE_SUBDIR if self.state_dir is not None else None

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        parse_bind(v)
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not _USER.fullmatch(v):
            raise ValueError("must be a user name (letters, digits, '.', '_', '-'; at most 32) or a numeric uid")
        return v

    @model_validator(mode="after")
    def _signature_needs_key(self) -> WorkerConfig:
        if self.require_signature and self.model_public_key is None:
            raise ValueError("require_signature needs model_public_key")
        return self

    @field_validator("tp_master")
    @classmethod
    def _tp_master(cls, v: str | None) -> str | None:
        if v is not None and (not re.search(r":[0-9]+$", v) or parse_bind(v)[1] == 0):
            raise ValueError("must be HOST:PORT (or [V6]:PORT) with a port in 1..65535")
        return v

    @field_validator("tp_secret_file")
    @classmethod
    def _tp_secret(cls, v: Path | None) -> Path | None:
        if v is not None:
            read_tp_secret(v)
        return v

    @model_validator(mode="after")
    def _tensor_parallel(self) -> WorkerConfig:
        given = [n for n in ("tp_group_id", "tp_members", "tp_master", "tp_secret_file") if getattr(self, n) is not None]
        if self.tp_degree == 1:
            if given or self.tp_rank:
                raise ValueError(f"{', '.join(given) or 'tp_rank'} need(s) tp_degree > 1")
            return self
        missing = [n for n in ("tp_group_id", "tp_members", "tp_master", "tp_secret_file") if n not in given]
        if missing:
            raise ValueError(f"tp_degree {self.tp_degree} needs {', '.join(missing)}")
        if self.tp_rank >= self.tp_degree:
            raise ValueError(f"tp_rank {self.tp_rank} must be below tp_degree {self.tp_degree}")
        members = self.tp_member_ids
        if len(members) != self.tp_degree or not all(_ID.fullmatch(m) for m in members) or len(set(members)) != len(members):
            raise ValueError(f"tp_members must list {self.tp_degree} distinct worker ids, rank 0 first")
        if members[self.tp_rank] != self.worker_id:
            raise ValueError(f"tp_members names {members[self.tp_rank]!r} as rank {self.tp_rank}, "
                             f"but this worker is {self.worker_id!r}")
        if not self.model and self.tp_rank > 0:
            raise ValueError(f"tensor parallel rank {self.tp_rank} needs --model: a member serves no API, so no "
                             "POST /worker/commit can reach it (rank 0 may take its shard from one)")
        return self

    @property
    def tp_member_ids(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.tp_members.split(",")) if self.tp_members else ()

    @model_validator(mode="after")
    def _one_root_policy(self) -> WorkerConfig:
        if self.allow_root and self.user is not None:
            raise ValueError("allow_root and user exclude each other: --user drops root, --allow-root keeps it")
        return self

    @property
    def host(self) -> str:
        return parse_bind(self.bind)[0]

    @property
    def listen_port(self) -> int:
        """--port overrides the port part of the bind address; 0 asks the OS for a free one."""
        return self.port if self.port is not None else parse_bind(self.bind)[1]

    @property
    def dev_mode(self) -> bool:
        """SPEC "GPU only": CPU execution is an explicit development/test mode, never implied."""
        return self.device == "cpu"


def read_tp_secret(path: Path) -> bytes:
    """The tensor-parallel group secret: at least 16 bytes (surrounding whitespace dropped), owner-only."""
    try:
        st = path.stat()
        secret = path.read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cannot read the file ({e.strerror or e})") from None
    if st.st_mode & 0o077:
        raise ValueError(f"is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"holds {len(secret)} bytes; the group secret needs at least {MIN_SECRET_BYTES}")
    return secret


def parse_bind(value: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` (SPEC 4991); a bare host keeps port 8001."""
    host, port_text = value, "8001"
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise ValueError("an IPv6 bind address must look like [::1]:8001")
        host, rest = value[1:close], value[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected HOST:PORT or [IPV6]:PORT")
            port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif ":" in value:
        raise ValueError("write an IPv6 bind address in brackets: [::1]:8001")
    if not host or not _HOST.fullmatch(host) and not _is_ip(host):
        raise ValueError(f"host {host!r} is not a hostname or IP address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} must be an integer in 0..65535")
    return host, int(port_text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def read_config_file(path: Path) -> dict[str, Any]:
    """The JSON object of --config, with SPEC 4981 aliases mapped onto field names."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config: --config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: --config {path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config: --config {path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: --config {path}: must be a JSON object")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = JSON_ALIASES.get(str(key), str(key))
        if name in out:
            raise ConfigError(f"config: {key} (config file): given twice, also as {name}")
        out[name] = value
    if "execution_timeout_ms" in out:  # SPEC 4982 unit; the daemon counts seconds
        ms = out.pop("execution_timeout_ms")
        if "inference_timeout_sec" in out:
            raise ConfigError("config: execution_timeout_ms (config file): given together with inference_timeout_sec")
        out["inference_timeout_sec"] = ms / 1000 if isinstance(ms, (int, float)) and not isinstance(ms, bool) else ms
    return out


def env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """The environment layer. Token file path precedence (SPEC 4910-4913), highest first:
    --api-token-file > config file api_token_file > WORKER_API_TOKEN_FILE >
    $CREDENTIALS_DIRECTORY/worker-token (systemd LoadCredential=) > /etc/llorch/worker-token.
    An explicit setting always wins; the systemd credential only replaces the built-in default.
    """
    for var in TOKEN_VALUE_VARS:
        if var in env:
            raise ConfigError(
                f"config: {var} is set, but the API token is never read from the environment (SPEC 4910): "
                "put it in a file with mode 0600 and point --api-token-file or WORKER_API_TOKEN_FILE at it"
            )
    out: dict[str, Any] = {field: env[var] for var, field in ENV_VARS.items() if var in env}
    if "api_token_file" not in out and env.get("CREDENTIALS_DIRECTORY"):
        out["api_token_file"] = str(Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME)
    if env.get("STATE_DIRECTORY"):  # systemd StateDirectory=; with several entries, the first one
        out["state_dir"] = env["STATE_DIRECTORY"].split(":")[0]
    return out


def load_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> WorkerConfig:
    """Merge the sources by precedence and validate; raise ConfigError with one line."""
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = [("environment", env_values(env))]
    if config_file is not None:
        layers.append(("config file", read_config_file(config_file)))
    layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in layers:
        for key, value in values.items():
            merged[key] = value
            origin[key] = source
    try:
        return WorkerConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_one_line(e, origin)) from None


def _one_line(e: ValidationError, origin: Mapping[str, str]) -> str:
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a rule across fields: the message names them
        return f"config: {msg}"
    field = loc[0]
    where = _where(field, origin.get(field, ""))
    if err["type"] == "extra_forbidden":
        msg = "unknown setting"
    elif err["type"] == "missing":
        msg = "required" + (" (--worker-id)" if field == "worker_id" else "")
    value = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else f" (got {value!r})"
    return f"config: {field}{where}: {msg}{shown}"


def _where(field: str, source: str) -> str:
    if source == "flag":
        return f" (--{field.replace('_', '-')})"
    if source == "environment":
        var = next((k for k, v in ENV_VARS.items() if v == field), SYSTEMD_DIRS.get(field, "environment"))
        return f" ({var})"
    if source == "config file":
        return " (config file)"
    return ""
