"""`worker-orcd serve`: the daemon's startup sequence and exit (SPEC 4020-4031, "Callback", 4970-4972).

Order: configuration (exit 2 on any bad value) -> API token file (fail fast)
-> open the device -> load, verify and seal ``--model`` (or wait for
``POST /worker/commit``) -> listen -> readiness callback -> accept work.
Any startup failure is logged, reported through the status callback when a
URL is configured, and exits 1. SIGTERM/SIGINT and ``POST /shutdown`` drain
and exit 0 within ``--shutdown-timeout-sec`` (a watchdog guarantees it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from . import __version__, logs
from .auth import BearerAuth, read_token_file
from .config import ConfigError, WorkerConfig, load_config
from .errors import ErrorCode, WorkerError
from .gguf.reader import GGUFFile
from .lifecycle import (
    Commit,
    EngineBinding,
    EngineLike,
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
    ("--max-model-size-bytes", "MAX_MODEL_SIZE for loads and streamed commits (default 100 GB)"),
    ("--upload-dir", "where streamed commit bodies are staged (default: the system temp dir)"),
    ("--sse-keepalive-sec", "SSE keep-alive comment interval while no token flows (default 5)"),
    ("--callback-attempts", "readiness callback attempts before giving up (default 6)"),
    ("--callback-timeout-sec", "per-attempt callback timeout (default 5)"),
)
_METAVARS: dict[str, str] = {
    "--worker-id": "ID", "--pool-id": "ID", "--model": "REF", "--model-root": "DIR", "--expected-sha256": "HEX",
    "--model-public-key": "PEM", "--device": "cuda|cpu", "--gpu-device": "N", "--bind": "HOST[:PORT]",
    "--port": "PORT", "--callback-url": "URL", "--advertise-url": "URL", "--api-token-file": "FILE",
    "--log-level": "LEVEL", "--max-prompt-chars": "N", "--max-tokens-out": "N", "--max-tokens-in": "N",
    "--inference-timeout-sec": "SEC", "--shutdown-timeout-sec": "SEC", "--kv-cache-size-mb": "MB",
    "--max-model-size-bytes": "BYTES", "--upload-dir": "DIR", "--sse-keepalive-sec": "SEC", "--callback-attempts": "N",
    "--callback-timeout-sec": "SEC",
}
_SWITCHES: tuple[tuple[str, str], ...] = (
    ("--require-signature", "refuse models without a verifying signature (needs --model-public-key)"),
    ("--ready-open", "serve GET /worker/ready without authentication (SPEC 4200)"),
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


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(config.log_level, worker_id=config.worker_id, gpu_device=config.gpu_device, device=config.device)
    try:
        return asyncio.run(serve(config, real_binding(config)))
    except KeyboardInterrupt:
        return EXIT_OK


def real_binding(config: WorkerConfig) -> EngineBinding:
    """The engine, reached lazily: torch is imported only when the device is opened."""

    def open_engine() -> EngineLike:
        from .engine.api import Engine

        return Engine.open(config.device, config.gpu_device)

    def sampling_params(**kw: Any) -> Any:
        from .engine.api import SamplingParams

        return SamplingParams(**kw)

    def tokenizer(gguf: GGUFFile) -> TokenizerLike:
        from .tokenizer import GGUFTokenizer

        return GGUFTokenizer.from_gguf(gguf)

    return EngineBinding(open=open_engine, sampling_params=sampling_params, tokenizer=tokenizer)


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: SIGTERM must drain first (SPEC 4970), not just stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
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
) -> int:
    """Run the worker until it is told to stop; returns the process exit code.

    ``force_exit`` is what the shutdown watchdog calls; ``on_worker`` lets an in-process
    caller (tests) reach the worker. Signals are handled only on the main thread.
    """
    worker = Worker(config, binding, force_exit=force_exit)
    if on_worker is not None:
        on_worker(worker)
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, worker, sig)
    logs.event(
        "startup",
        f"worker-orcd {__version__} starting as {config.worker_id} on {config.device} device {config.gpu_device}"
        + (" (CPU DEVELOPMENT MODE)" if config.dev_mode else "") + ".",
        version=__version__, pid=os.getpid(), dev_mode=config.dev_mode,
    )
    server: _Server | None = None
    serving: asyncio.Task[None] | None = None
    startup = asyncio.create_task(_start(worker, config))
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
        await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
    except WorkerError as e:
        return await _startup_failed(worker, e)
    except Exception as e:  # noqa: BLE001 - untyped failure: INTERNAL, traceback only in the log
        logs.event("internal_error", f"Unexpected {type(e).__name__} during startup.", level=logging.ERROR, exc=e)
        return await _startup_failed(worker, WorkerError("internal error during startup; see the log", code=ErrorCode.INTERNAL))
    finally:
        stop.cancel()
        if server is not None and serving is not None:
            server.should_exit = True
            await serving
    await worker.close()
    worker.finish()
    return worker.exit_code


async def _start(worker: Worker, config: WorkerConfig) -> tuple[_Server, asyncio.Task[None]]:
    auth = BearerAuth(read_token_file(config.api_token_file))
    await worker.open_device()
    if config.model:
        await worker.commit(
            Commit(
                model_ref=config.model, source=config.model, model_root=config.model_root,
                expected_sha256=config.expected_sha256,
            )
        )
    sock = _listen(config.host, config.listen_port)
    worker.uri = _uri(config, sock)

    from .http import create_app

    app = create_app(worker, auth)
    uv = uvicorn.Config(
        app, lifespan="off", log_config=None, access_log=False, http="h11", server_header=False,
        timeout_graceful_shutdown=shutdown_grace(config.shutdown_timeout_sec) / 4,  # type: ignore[arg-type]
    )
    server = _Server(uv)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()
            raise WorkerError("the HTTP server stopped during startup", code=ErrorCode.INTERNAL)
        await asyncio.sleep(0.01)
    logs.event("listening", f"Listening on {worker.uri}.", uri=worker.uri, port=sock.getsockname()[1])
    if worker.handle is not None:
        try:
            await worker.announce_ready()  # listening first, then the callback (SPEC "Callback")
        except BaseException:
            server.should_exit = True
            await serving
            raise
    else:
        logs.event("awaiting_commit", "No --model given: waiting for POST /worker/commit.")
    return server, serving


def _on_signal(worker: Worker, sig: int) -> None:
    name = signal.Signals(sig).name
    logs.event("signal", f"Received {name}: shutting down gracefully.", signal=name)
    worker.request_shutdown(name)


async def _startup_failed(worker: Worker, error: WorkerError) -> int:
    logs.event(
        "startup_failed", f"Startup failed: {error.message}", level=logging.ERROR,
        code=error.code.value, error=error.message,
    )
    worker.set_state(State.STOPPED)
    await worker.report_failure(error)
    await worker.close()
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker_orcd.serve ...` until cli.py routes `worker-orcd serve` here."""
    parser = argparse.ArgumentParser(prog=f"{PROG} serve", description="Run the worker daemon.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
