"""`worker-orcd serve`: the daemon's startup sequence and exit (SPEC 4020-4031, "Callback", 4970-4972).

Order: configuration and root policy (exit 2 on any bad value) -> API token
file (fail fast) -> open the device -> bind the port -> drop privileges
(SPEC 4901) -> listen -> load, verify and seal ``--model`` (or wait for
``POST /worker/commit``) -> readiness callback -> accept work.
The socket is bound before the drop (a privileged port needs root). It listens
while the model loads (issue 13): ``/health`` answers 503 ``loading`` with the
upload's progress, every other route but ``/worker/ready`` and ``/shutdown``
503 ``WORKER_NOT_READY``. Models are read only after the drop: the model root
must be readable by ``--user``. Any startup failure (a failed load included)
is logged, reported through the status callback when a URL is configured, and
exits 1; the worker never serves a model that did not seal. SIGTERM/SIGINT and ``POST /shutdown`` drain
and exit 0 within ``--shutdown-timeout-sec`` (a watchdog guarantees it).
SIGHUP re-reads the token file (rotation without a restart; SPEC 4913).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Generator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from . import __version__, logs, privileges
from .auth import BearerAuth, TokenFile, TokenFileError
from .config import SEAL_CHECK_INTERVAL_MS, ConfigError, WorkerConfig, load_config, parse_bind, read_tp_secret
from .engine.tp_plan import TPSpec
from .engine.events import SamplingParams
from .engine.interface import EngineLike
from .errors import ErrorCode, WorkerError
from .gguf.reader import GGUFFile
from .lifecycle import (
    Commit,
    EngineBinding,
    State,
    TokenizerLike,
    Worker,
    shutdown_grace,
)

PROG = "worker-orcd"
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

# (flag, help). Every flag is read as a string and validated by WorkerConfig, so a bad
# value gets the same one-line message as a bad config-file or environment value.
_FLAGS: tuple[tuple[str, str], ...] = (
    ("--worker-id", "this worker's id, as the pool manager knows it (required)"),
    ("--pool-id", "pool this worker belongs to"),
    ("--model", (
        "model to load at startup: path under --model-root, file:/abs/path.gguf or shm:NAME; "
        "without it the worker waits for POST /worker/commit"
    )),
    ("--model-root", "directory every model path must resolve under (default /var/lib/worker-orcd/models)"),
    ("--expected-sha256", "refuse --model unless its SHA-256 is this"),
    ("--model-public-key", "Ed25519 public key (PEM); the model's .sig must verify"),
    ("--device", "cuda (default) or cpu: explicit development/test mode, never for production"),
    ("--gpu-device", "CUDA device index (env WORKER_GPU_DEVICE; default 0)"),
    ("--bind", "listen address HOST[:PORT] or [V6]:PORT (env WORKER_BIND_ADDR; default 127.0.0.1:8001)"),
    ("--port", "listen port; overrides the port of --bind (0 = any free port, reported in the callback)"),
    ("--callback-url", "pool manager base URL; without it the worker runs standalone"),
    ("--advertise-url", "URL sent as 'uri' in the readiness callback (default http://HOST:PORT)"),
    ("--api-token-file", (
        "file with the API bearer token(s), one per line (env WORKER_API_TOKEN_FILE; "
        "default $CREDENTIALS_DIRECTORY/worker-token or /etc/llorch/worker-token)"
    )),
    ("--log-level", "debug, info (default), warning or error (env WORKER_LOG_LEVEL)"),
    ("--max-prompt-chars", "longest prompt in characters (default 100000)"),
    ("--max-tokens-out", "largest max_tokens a request may ask for (default 4096)"),
    ("--max-tokens-in", "longest prompt in tokens (default: the model's context minus one)"),
    ("--inference-timeout-sec", "per-job time limit (default 300)"),
    ("--shutdown-timeout-sec", "drain limit on SIGTERM or POST /shutdown (default 30)"),
    ("--kv-cache-size-mb", "KV cache budget; bounds the context (default: the engine's choice)"),
    ("--max-batch", "jobs batched at once (alias slots_total; default: what the KV pool holds for ~1k-token jobs, capped at 128 on a GPU, 8 on the CPU; 1 = one job at a time)"),
    ("--max-queue", "admitted jobs waiting for a batch slot before callers get WORKER_BUSY (default 256; none with --max-batch 1)"),
    ("--prefill-chunk", "tokens per engine step: decode rows plus prompt chunks (default 512 on a GPU, 256 on the CPU)"),
    ("--mixed-step-tokens", "tokens of a step while streams decode (decode rows plus arriving prompt chunks; never fewer than the decode rows): smaller evens out inter-token latency, larger admits prompts faster (default 256 on a GPU; the CPU: --prefill-chunk)"),
    ("--seal-check-interval-ms", "while jobs run, a seal check (a read of every resident weight byte beside their steps) starts at most this often; arriving jobs wait for the next one (default %g; 0 = a check whenever jobs arrive and none runs; with nothing running a check starts at once)" % SEAL_CHECK_INTERVAL_MS),
    ("--resident-weights", "dense (default: quantized matrices dequantized once at load to fp16/bf16, the fastest kernels), quantized (GGUF blocks stay resident: about a third of the VRAM for Q4_K_M; ggml's dequantized values) or quantized-half2 (the same bytes; Q4_K/Q6_K dequantized in packed fp16 and stored in the tensor core's fragment order: a 7B Q4_K_M decodes faster than dense, prefill is slower; values differ from ggml's by the fp16 rounding of the scales)"),
    ("--event-loop", "asyncio (default): the standard library's event loop; uvloop: libuv's (uvloop)"),
    ("--engine-process", "on (default): the engine runs in a child process of the worker, so its loop never waits for the HTTP side's Python; off: in the worker's process (tensor-parallel workers always)"),
    ("--max-model-size-bytes", "MAX_MODEL_SIZE for loads and streamed commits (default 100 GB)"),
    ("--upload-dir", "where streamed commit bodies are staged (default: the system temp dir)"),
    ("--state-dir", (
        "persistent state: Triton's compiled kernels go to DIR/triton-cache and survive restarts "
        "(default $STATE_DIRECTORY, set by systemd StateDirectory=; else Triton's own cache dir)"
    )),
    ("--sse-keepalive-sec", "SSE keep-alive comment interval while no token flows (default 5)"),
    ("--chat-template", "Jinja chat template file for /v1/chat/completions, replacing the model's own"),
    ("--callback-attempts", "readiness callback attempts before giving up (default 6)"),
    ("--callback-timeout-sec", "per-attempt callback timeout (default 5)"),
    ("--tp-degree", "tensor parallel: processes (one per device) in the group (default 1: no group)"),
    ("--tp-rank", "tensor parallel: this process's rank; 0 serves HTTP/SSE and schedules, the others follow it"),
    ("--tp-group-id", "tensor parallel: the group's id (from the pool manager)"),
    ("--tp-members", "tensor parallel: the group's worker ids in rank order, comma-separated (rank 0 first)"),
    ("--tp-master", "tensor parallel: HOST:PORT where rank 0 listens for its members (a private network)"),
    ("--tp-secret-file", "tensor parallel: file with the group's shared secret (>= 16 bytes, mode 0600)"),
    ("--tp-timeout-sec", "tensor parallel: limit of every collective; a peer lost for longer stops the group (default 60)"),
    ("--user", (
        "started as root: open the GPU and bind the port, then drop to this user and its primary group "
        "for good (required when run as root; SPEC 4901)"
    )),
)
_METAVARS: dict[str, str] = {
    "--worker-id": "ID", "--pool-id": "ID", "--model": "REF", "--model-root": "DIR", "--expected-sha256": "HEX",
    "--model-public-key": "PEM", "--device": "cuda|cpu", "--gpu-device": "N", "--bind": "HOST[:PORT]",
    "--port": "PORT", "--callback-url": "URL", "--advertise-url": "URL", "--api-token-file": "FILE",
    "--log-level": "LEVEL", "--max-prompt-chars": "N", "--max-tokens-out": "N", "--max-tokens-in": "N",
    "--inference-timeout-sec": "SEC", "--shutdown-timeout-sec": "SEC", "--kv-cache-size-mb": "MB", "--max-batch": "N",
    "--max-queue": "N", "--prefill-chunk": "TOKENS", "--mixed-step-tokens": "TOKENS", "--seal-check-interval-ms": "MS", "--resident-weights": "dense|quantized|quantized-half2", "--engine-process": "on|off", "--event-loop": "asyncio|uvloop", "--max-model-size-bytes": "BYTES", "--upload-dir": "DIR", "--state-dir": "DIR",
    "--sse-keepalive-sec": "SEC", "--chat-template": "FILE", "--callback-attempts": "N",
    "--callback-timeout-sec": "SEC", "--user": "NAME", "--tp-degree": "T", "--tp-rank": "R", "--tp-group-id": "ID",
    "--tp-members": "ID,ID,...", "--tp-master": "HOST:PORT", "--tp-secret-file": "FILE", "--tp-timeout-sec": "SEC",
}
_SWITCHES: tuple[tuple[str, str], ...] = (
    ("--require-signature", "refuse models without a verifying signature (needs --model-public-key)"),
    ("--ready-open", "serve GET /worker/ready without authentication (SPEC 4200)"),
    ("--allow-root", "keep running as root without --user: development/CI only, never production (SPEC 4900)"),
)


def add_serve_parser(subparsers: Any) -> None:
    """Register `serve` on the CLI's subparsers (cli.py wires it in)."""
    p = subparsers.add_parser(
        "serve",
        help="run the worker daemon (HTTP/SSE API on one GPU)",
        description="Load and seal one model on one device and serve it over HTTP + SSE. "
        "Precedence: flags > --config JSON file > WORKER_* environment > defaults.",
    )
    add_serve_arguments(p)
    p.set_defaults(run=run_serve)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.json", help="JSON config file (flags win over it)")
    for flag, text in _FLAGS:
        p.add_argument(flag, metavar=_METAVARS.get(flag, "VALUE"), default=None, help=text)
    for flag, text in _SWITCHES:
        p.add_argument(flag, action="store_const", const=True, default=None, help=text)


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> WorkerConfig:
    names = [f.removeprefix("--").replace("-", "_") for f, _ in (*_FLAGS, *_SWITCHES)]
    flags = {n: getattr(args, n) for n in names}
    return load_config(flags, os.environ if env is None else env, Path(args.config) if args.config else None)


FULL_COLLECTION_EVERY = 100  # gen-1 collections per full one (CPython: 10)


def settle_heap() -> None:
    """After a load: every object alive now (torch, Triton, the model's Python side: ~336k on the CI
    machine, where one full collection then takes ~200 ms: benchmarks/bench_gc.py) leaves the cyclic
    collector's reach, so the rare full collections while serving scan only what was made since,
    instead of stalling every stream for that long. Full collections are then made 10x rarer: what
    they scan while serving is the in-flight requests' state (on an H200 at 64 clients, 27-66 ms per
    collection every 5-7 s, each stalling every stream; none in a 9 s window with 100 — benchmarks/
    RESULTS.md, 13th session); cyclic garbage is still collected, ten times less often."""
    gc.collect()
    gc.freeze()
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, FULL_COLLECTION_EVERY)


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        plan = privileges.decide(config.user, config.allow_root, os.geteuid())
    except privileges.PrivilegeError as e:
        print(f"{PROG}: error: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(config.log_level, worker_id=config.worker_id, gpu_device=config.gpu_device, device=config.device)
    use_state_dir(config, os.environ)
    if plan is None:
        logs.event(
            "running_as_root", "Running as root because --allow-root was given: development/CI only, never production.",
            level=logging.WARNING,
        )
    try:
        if config.tp_rank > 0:
            from .tp_member import serve_member

            code = run_loop(serve_member(config, real_binding(config), drop_plan=plan), config.event_loop)
        else:
            code = run_loop(serve(config, real_binding(config), drop_plan=plan, settle_heap_after_load=True),
                            config.event_loop)
    except KeyboardInterrupt:
        code = EXIT_OK
    gc.unfreeze()  # let interpreter exit collect the start-up heap as it would have (settle_heap)
    return exit_process(code)


def run_loop(main: Coroutine[Any, Any, int], event_loop: str) -> int:
    """Run the worker's coroutine on uvloop's event loop (``--event-loop uvloop``) or asyncio's."""
    factory = None
    if event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def use_state_dir(config: WorkerConfig, env: MutableMapping[str, str]) -> Path | None:
    """Point Triton's kernel cache into ``--state-dir`` before anything imports triton (issue 13: a warm start).

    An explicit ``TRITON_CACHE_DIR`` in the environment is the operator's more specific choice and wins.
    Returns the cache directory now in effect through the state dir, or None.
    """
    cache = config.triton_cache_dir
    if cache is None:
        return None
    if env.get("TRITON_CACHE_DIR"):
        logs.event("triton_cache", "TRITON_CACHE_DIR is set ({file}): it wins over --state-dir for Triton's kernel cache.",
                   file=env["TRITON_CACHE_DIR"])
        return None
    env["TRITON_CACHE_DIR"] = str(cache)
    logs.event("triton_cache", "Triton's kernel cache is {file}: compiled kernels persist across restarts.", file=str(cache))
    return cache


def exit_process(code: int, exit_now: Callable[[int], None] = os._exit) -> int:
    """Exit with ``code`` even while an engine thread is still inside torch (issue 10, defect 1).

    A drain may cancel a job whose thread cannot stop yet (a long prefill, a device call):
    its slot is abandoned and the process ends. Letting the interpreter finalise then is
    fatal: CPython ends a daemon thread that wakes up during finalisation with
    ``pthread_exit``, whose forced unwind through torch's ``noexcept`` C++ frames calls
    ``std::terminate`` (SIGABRT, rc -6, a non-JSON line on stderr) after the log already said
    "exit code 0". So when any other thread is alive, everything logged is flushed and the
    process leaves at once with the code the log stated. With no thread left the
    interpreter exits normally.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if others:
        logs.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        exit_now(code)
    return code


def real_binding(config: WorkerConfig) -> EngineBinding:
    """The engine, reached lazily: torch is imported only when the device is opened (in the engine
    process, by default: then never in this one)."""

    def open_engine() -> EngineLike:
        if config.engine_process == "on" and config.tp_degree == 1:
            from .engine_process.proxy import ProcessEngine

            return ProcessEngine.open(config.device, config.gpu_device, config.resident_weights)
        from .engine.api import Engine

        return Engine.open(config.device, config.gpu_device, config.resident_weights, tp=tp_spec(config))

    def tokenizer(gguf: GGUFFile) -> TokenizerLike:
        from .tokenizer import GGUFTokenizer

        return GGUFTokenizer.from_gguf(gguf)

    return EngineBinding(open=open_engine, sampling_params=SamplingParams, tokenizer=tokenizer)


def tp_spec(config: WorkerConfig) -> TPSpec | None:
    """This process's tensor-parallel membership (the secret read now, never logged), or None."""
    if config.tp_degree == 1:
        return None
    assert config.tp_group_id and config.tp_master and config.tp_secret_file
    host, port = parse_bind(config.tp_master)
    return TPSpec(
        degree=config.tp_degree, rank=config.tp_rank, group_id=config.tp_group_id, members=config.tp_member_ids,
        master_host=host, master_port=port, secret=read_tp_secret(config.tp_secret_file),
        timeout_s=config.tp_timeout_sec, heartbeat_s=min(1.0, config.tp_timeout_sec / 4),
    )


def model_commit(config: WorkerConfig) -> Commit:
    """``--model`` as a commit: with tensor parallel, this rank's shard of it."""
    assert config.model
    spec = tp_spec(config)
    return Commit(
        model_ref=config.model, source=config.model, model_root=config.model_root,
        expected_sha256=config.expected_sha256,
        shard_id=spec.shard_id if spec else None, shard_index=config.tp_rank, total_shards=config.tp_degree,
    )


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: SIGTERM must drain first (SPEC 4970), not just stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """Bound, not listening: asyncio calls listen() when uvicorn starts serving on it."""
    sock: socket.socket | None = None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise WorkerError(f"cannot listen on {host}:{port}: {e.strerror or e}", code=ErrorCode.INTERNAL) from None
    sock.setblocking(False)
    return sock


def _uri(config: WorkerConfig, sock: socket.socket) -> str:
    if config.advertise_url:
        return config.advertise_url
    host, port = config.host, sock.getsockname()[1]
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    config: WorkerConfig,
    binding: EngineBinding,
    *,
    force_exit: Callable[[int], None] = os._exit,
    on_worker: Callable[[Worker], None] | None = None,
    drop_plan: privileges.DropPlan | None = None,
    settle_heap_after_load: bool = False,
) -> int:
    """Run the worker until it is told to stop; returns the process exit code.

    ``force_exit`` is what the shutdown watchdog calls; ``on_worker`` lets an in-process
    caller (tests) reach the worker. Signals are handled only on the main thread.
    ``drop_plan`` (from ``privileges.decide``) is applied after device open and bind;
    ``None`` leaves the process's privileges alone (in-process callers, --allow-root).
    ``settle_heap_after_load``: ``settle_heap()`` after each load (the daemon; process-wide, so
    not for in-process callers).
    """
    worker = Worker(config, binding, force_exit=force_exit,
                    on_loaded=settle_heap if settle_heap_after_load else None)
    tokens = TokenFile(config.api_token_file)
    if on_worker is not None:
        on_worker(worker)
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, worker, sig)
        loop.add_signal_handler(signal.SIGHUP, _on_sighup, tokens)  # from here on SIGHUP never kills
    logs.event(
        "startup",
        "worker-orcd {version} starting as {worker_id} on {device} device {gpu_device}"
        + (" (CPU DEVELOPMENT MODE)." if config.dev_mode else "."),
        version=__version__, pid=os.getpid(), dev_mode=config.dev_mode, device=config.device,
    )
    server: _Server | None = None
    serving: asyncio.Task[None] | None = None
    startup = asyncio.create_task(_start(worker, config, tokens, drop_plan))
    stop = asyncio.create_task(worker.stop_requested.wait())
    try:
        await asyncio.wait({startup, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not startup.done():
            # Told to stop while starting. A load running on a thread cannot be interrupted and the
            # device must not be closed under it: leave both to process exit (the watchdog bounds it).
            startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await startup
            logs.event("startup_aborted", "Stop requested during startup; exiting without serving.", level=logging.WARNING)
            worker.finish()
            return worker.exit_code
        server, serving = startup.result()
        if config.model:
            loading = asyncio.create_task(_load_and_announce(worker, config))
            await asyncio.wait({loading, serving, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not loading.done():
                # Stopped (or the server died) while loading: the load thread cannot be interrupted and the
                # device must not be closed under it; both are left to process exit (the watchdog bounds it).
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loading
                if serving.done():
                    serving.result()
                    raise WorkerError("the HTTP server stopped while the model was loading", code=ErrorCode.INTERNAL)
                logs.event("startup_aborted", "Stop requested during startup; exiting without serving.", level=logging.WARNING)
                worker.finish()
                return worker.exit_code
            loading.result()
        await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
    except WorkerError as e:
        return await _startup_failed(worker, e)
    except Exception as e:  # noqa: BLE001 - untyped failure: INTERNAL, traceback only in the log
        logs.event("internal_error", "Unexpected {exc_type} during startup.", level=logging.ERROR, exc=e)
        return await _startup_failed(worker, WorkerError("internal error during startup; see the log", code=ErrorCode.INTERNAL))
    finally:
        stop.cancel()
        if server is not None and serving is not None:
            server.should_exit = True
            await serving
    await worker.close()
    worker.finish()
    return worker.exit_code


async def _start(
    worker: Worker, config: WorkerConfig, tokens: TokenFile, plan: privileges.DropPlan | None,
) -> tuple[_Server, asyncio.Task[None]]:
    """Everything up to listening; the model (if any) loads afterwards, while /health answers."""
    if plan is not None:
        privileges.harden_early(plan)  # before open_device starts the first thread: every thread inherits it
    auth = tokens.load()  # fail fast, before the device (SPEC 4913)
    await worker.open_device()
    sock = _bind(config.host, config.listen_port)
    try:
        worker.uri = _uri(config, sock)
        server = _http_server(worker, config, auth)
        if plan is not None:
            _drop_privileges(plan, config, tokens)
            drop = getattr(worker.engine, "drop_privileges", None)
            if drop is not None:  # the engine process (engine_process/proxy.py) drops to the same account
                drop(plan)
    except BaseException:
        sock.close()
        raise
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()
            raise WorkerError("the HTTP server stopped during startup", code=ErrorCode.INTERNAL)
        await asyncio.sleep(0.01)
    logs.event("listening", "Listening on {uri}.", uri=worker.uri, port=sock.getsockname()[1])
    if not config.model:
        logs.event("awaiting_commit", "No --model given: waiting for POST /worker/commit.")
    return server, serving


async def _load_and_announce(worker: Worker, config: WorkerConfig) -> None:
    """Load, verify and seal ``--model`` while listening, then the readiness callback (SPEC 4023, 4031)."""
    await worker.commit(model_commit(config))
    await worker.announce_ready()  # sealed and listening, then the callback (SPEC "Callback")


def _http_server(worker: Worker, config: WorkerConfig, auth: BearerAuth) -> _Server:
    """The app and uvicorn, fully imported and configured while every file is still readable."""
    from . import tokenizer  # noqa: F401 - imported lazily by a later commit; import it before the drop
    from .http import create_app
    from .http.protocol import WorkerH11Protocol

    uv = uvicorn.Config(
        create_app(worker, auth), lifespan="off", log_config=None, access_log=False, http=WorkerH11Protocol,
        server_header=False,
        timeout_graceful_shutdown=shutdown_grace(config.shutdown_timeout_sec) / 4,  # type: ignore[arg-type]
    )
    uv.load()  # imports the protocol modules now, not after the privilege drop
    return _Server(uv)


def _drop_privileges(plan: privileges.DropPlan, config: WorkerConfig, tokens: TokenFile) -> None:
    """SPEC 4901: device open and port bound; drop before any model byte is read or request served."""
    privileges.drop(plan)
    target = plan.target
    who = f"user {target.name} (uid {target.uid}, gid {target.gid})" if target else f"uid {os.getuid()}"
    try:
        tokens.load()  # SIGHUP re-reads the file as this user: prove now that it can
    except TokenFileError as e:
        owner = target.name if target else str(os.getuid())
        raise TokenFileError(
            f"{e.message} (read as {who} after the privilege drop: the token file must be owned by and readable "
            f"by that user, e.g. `chown {owner} {tokens.path}`)"
        ) from None
    rw, ro = os.W_OK | os.X_OK, os.R_OK | os.X_OK
    needs: list[tuple[Path | None, int, str, str]] = [
        (config.model_root, ro, "readable", ""),
        (config.upload_dir, rw, "writable", ""),
    ]
    if config.device == "cuda":  # Triton compiles kernels at the first load, i.e. after the drop
        needs.append((_nearest_existing(triton_cache_dir(os.environ)), rw, "writable",
                      ": it holds Triton's kernel cache; point --state-dir (or TRITON_CACHE_DIR, TRITON_HOME) at a "
                      "directory the user owns"))
    for path, mode, what, why in needs:  # fail now, not at the first commit
        if path is not None and not _usable(path, mode):
            raise privileges.PrivilegeError(f"{path} must be {what} by {who} after the privilege drop{why}")
    logs.event(
        "privileges_dropped",
        "Running as {user} (uid {uid}, gid {gid}): supplementary groups cleared, no_new_privs set, "
        "capability sets empty."
        if target else "Running unprivileged as uid {uid}: no_new_privs set, capability sets empty.",
        pid=os.getpid(), user=target.name if target else None, uid=os.getuid(), gid=os.getgid(),
    )


def triton_cache_dir(env: Mapping[str, str]) -> Path:
    """Where Triton (3.x) keeps compiled kernels: TRITON_CACHE_DIR, else $TRITON_HOME (or ~)/.triton/cache."""
    if env.get("TRITON_CACHE_DIR"):
        return Path(env["TRITON_CACHE_DIR"])
    home = env.get("TRITON_HOME") or env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".triton" / "cache"


def _nearest_existing(path: Path) -> Path:
    """The directory that must be writable for ``path`` to be created (os.makedirs)."""
    while not os.path.exists(path) and path != path.parent:  # False also where a parent is unsearchable
        path = path.parent
    return path


def _usable(path: Path, mode: int) -> bool:
    """``os.access`` for this process; a path that does not exist is left to whoever uses it."""
    try:
        path.stat()
    except FileNotFoundError:
        return True
    except OSError:  # EACCES on the way there: unreachable for this user
        return False
    return os.access(path, mode)


def _on_sighup(tokens: TokenFile) -> None:
    """Token rotation (SPEC 4913): a bad new file keeps the old tokens; running jobs are not touched."""
    if tokens.auth is None:
        logs.event("tokens_reload_skipped", "Received SIGHUP before the token file was first read; nothing to reload.",
                   signal="SIGHUP")
        return
    try:
        auth = tokens.load()
    except TokenFileError as e:
        logs.event(
            "tokens_reload_failed", "SIGHUP: kept the previous API tokens because the new file is unusable: {error}",
            level=logging.ERROR, signal="SIGHUP", code=e.code.value, error=e.message,
        )
        return
    fps = auth.fingerprints
    logs.event(
        "tokens_reloaded",
        "SIGHUP: API tokens reloaded from {file}: {callers} token(s), fp6 {fp6}. "
        "Tokens no longer in the file stop authenticating now; running jobs keep their owner.",
        signal="SIGHUP", file=str(tokens.path), callers=len(fps), fp6=", ".join(fps),
    )


def _on_signal(worker: Worker, sig: int) -> None:
    name = signal.Signals(sig).name
    logs.event("signal", "Received {signal}: shutting down gracefully.", signal=name)
    worker.request_shutdown(name)


async def _startup_failed(worker: Worker, error: WorkerError) -> int:
    logs.event(
        "startup_failed", "Startup failed: {error}", level=logging.ERROR,
        code=error.code.value, error=error.message + (f" ({error.detail})" if error.detail else ""),
    )
    worker.set_state(State.STOPPED)
    await worker.report_failure(error)  # the status callback first: telling the group may wait up to 30 s
    await worker.abandon_group(error)
    await worker.close()
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker_orcd.serve ...` until cli.py routes `worker-orcd serve` here."""
    parser = argparse.ArgumentParser(prog=f"{PROG} serve", description="Run the worker daemon.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
