#!/usr/bin/env python3
"""Re-run issue 10's adversarial list against a running worker and print a summary.

    python scripts/adversarial.py --url http://127.0.0.1:8001 --token-file TOKEN [--log worker.log]
        [--model-ref NAME --model-sha256 HEX]   # a sealed worker: repeat-commit attacks too
        [--quick]                               # fewer cases, shorter slow-client horizon

Families: hostile JSON bodies on every route, bad credentials, malformed HTTP,
trailing-slash redirects, slow clients (head, body, idle sockets), path-traversal
and disclosure probes on plan/commit, repeat commits on a sealed worker, a
cancel race. The summary counts cases tried, 500s, crashes (the worker stopped
answering /health), non-JSON error bodies, and - with ``--log`` - lines of the
worker's log that contain a prompt, generated text or the bearer token this
run sent. Exit status 1 when any of those is non-zero. Only the standard
library and httpx are needed; tests/test_reliability.py calls these functions.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ERROR_CODES = (
    "INVALID_PARAMS", "AUTH_FAILED", "FORBIDDEN", "NOT_FOUND", "MODEL_LOAD_FAILED", "CAPABILITY_MISMATCH",
    "SEAL_VERIFICATION_FAILED", "INSUFFICIENT_VRAM", "VRAM_OOM", "HOST_OOM", "CUDA_ERROR", "INFERENCE_TIMEOUT",
    "CANCELLED", "WORKER_BUSY", "WORKER_NOT_READY", "INTERNAL",
)
CANARY = "adv-canary-" + secrets.token_hex(6)  # inside every prompt: must never reach the log


@dataclass(frozen=True)
class Target:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Target:
        u = urlsplit(url)
        return cls(u.hostname or "127.0.0.1", u.port or 80)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def raw_exchange(t: Target, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one response: (status, lower-cased headers, body); status 0 = no answer."""
    with socket.create_connection((t.host, t.port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            if not lines[0].startswith("HTTP/"):
                return 0, {}, buf
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            want = int(headers.get("content-length", "0") or 0)
            while len(body) < want:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
            return int(lines[0].split()[1]), headers, body
        except (TimeoutError, OSError):
            return 0, {}, buf


def _auth(token: str) -> bytes:
    return f"Authorization: Bearer {token}\r\n".encode()


# name -> request bytes; every one is unparseable HTTP that the server can still answer (defect 7)
MALFORMED: dict[str, Callable[[str], bytes]] = {
    "bad_content_length": lambda tok: b"POST /cancel HTTP/1.1\r\nHost: w\r\n" + _auth(tok)
    + b"Content-Length: abc\r\n\r\n{}",
    "bad_chunk_size": lambda tok: b"POST /cancel HTTP/1.1\r\nHost: w\r\n" + _auth(tok)
    + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "nul_in_target": lambda tok: b"GET /hea\x00lth HTTP/1.1\r\nHost: w\r\n\r\n",
    "nul_in_header": lambda tok: b"GET /health HTTP/1.1\r\nHost: w\r\nX-A: b\x00c\r\n\r\n",
    "http_0_9": lambda tok: b"GET /health\r\n\r\n",
    "two_content_lengths": lambda tok: b"POST /cancel HTTP/1.1\r\nHost: w\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{}",
    "space_before_colon": lambda tok: b"GET /health HTTP/1.1\r\nHost : w\r\n\r\n",
}


@dataclass
class Summary:
    tried: int = 0
    status_5xx: list[str] = field(default_factory=list)
    non_json: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    crashes: int = 0
    families: dict[str, int] = field(default_factory=dict)

    def count(self, family: str, n: int = 1) -> None:
        self.tried += n
        self.families[family] = self.families.get(family, 0) + n

    def check(self, family: str, name: str, r: httpx.Response, allowed: set[int] | None = None) -> None:
        self.count(family)
        if r.status_code >= 500 and r.status_code not in (503, 504, 507):
            self.status_5xx.append(f"{family}:{name}:{r.status_code}")
        if r.status_code >= 400:
            try:
                body = r.json()
                assert body["code"] in ERROR_CODES and isinstance(body["message"], str)
            except (ValueError, KeyError, AssertionError, TypeError):
                self.non_json.append(f"{family}:{name}:{r.status_code}")
        if allowed is not None and r.status_code not in allowed:
            self.unexpected.append(f"{family}:{name}:{r.status_code}")


# --- families ------------------------------------------------------------------------------------


def hostile_bodies(c: httpx.Client, s: Summary, quick: bool) -> None:
    """Hand-made bad bodies on every JSON route: every one is a 4xx in the JSON shape."""
    values: list[Any] = [None, True, -1, 2**64, 1e308, float("-inf") if False else -1e308, "", "x" * 70_000,
                         "\u0000", "\ud7ff", [], {}, [[[[]]]], {"$ref": "#"}, "../../etc/passwd", "/proc/self/environ"]
    bodies: list[tuple[str, Any]] = [("empty", None), ("array", []), ("string", "x"), ("number", 1)]
    for key in ("prompt", "params", "job_id", "stream", "model_ref", "model_path", "expected_digest", "tp_degree",
                "shard_layout", "extra"):
        for i, v in enumerate(values[: 6 if quick else None]):
            bodies.append((f"{key}={i}", {key: v}))
    params = ("max_tokens", "temperature", "top_p", "top_k", "seed", "min_p", "repetition_penalty", "stop")
    for key in params:
        for i, v in enumerate(values[: 6 if quick else None]):
            bodies.append((f"params.{key}={i}", {"prompt": f"{CANARY} p", "params": {key: v}}))
    for path in ("/worker/execute", "/execute", "/cancel", "/worker/plan", "/worker/commit"):
        for name, body in bodies:
            r = c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            # a body that happens to be valid (e.g. a prompt "../../etc/passwd") may stream: 200 is fine
            s.check("hostile_body", f"{path}:{name}", r, allowed={200, 400, 404, 409, 422, 503})
        for name, raw in (("not_json", b"{"), ("deep", b"[" * 100_000), ("utf16", '{"a":1}'.encode("utf-16"))):
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
            s.check("hostile_body", f"{path}:{name}", r, allowed={400, 422})


def bad_credentials(t: Target, token: str, s: Summary) -> None:
    """Wrong, malformed and oversized credentials on every protected route: 401 before the body."""
    creds = ["", "Bearer", "Bearer ", "Basic abc", f"Bearer {token}x", f"Bearer {token[:-1]}", "Bearer " + "a" * 9000,
             f"bearer  {token}x", "Bearer \u00e9", f"Token {token}"]
    with httpx.Client(base_url=t.url, timeout=30) as c:
        for path in ("/worker/execute", "/execute", "/cancel", "/worker/plan", "/worker/commit", "/shutdown"):
            for i, cred in enumerate(creds):
                headers = {"content-type": "application/json"}
                if cred:
                    headers["authorization"] = cred
                try:
                    r = c.post(path, content=b"{", headers=headers)
                except (httpx.LocalProtocolError, UnicodeEncodeError):
                    s.count("bad_credentials")
                    continue
                s.check("bad_credentials", f"{path}:{i}", r, allowed={401})


def malformed_http(t: Target, token: str, s: Summary) -> None:
    for name, build in MALFORMED.items():
        s.count("malformed_http")
        status, headers, body = raw_exchange(t, build(token))
        if status >= 500:
            s.status_5xx.append(f"malformed_http:{name}:{status}")
        if status and not headers.get("content-type", "").startswith("application/json"):
            s.non_json.append(f"malformed_http:{name}:{status}")
        if status != 400:
            s.unexpected.append(f"malformed_http:{name}:{status}")


def redirects(c: httpx.Client, s: Summary) -> None:
    for path in ("/health/", "/metrics/", "/worker/ready/", "/worker/execute/", "//health"):
        r = c.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
        s.check("redirect", path, r, allowed={401, 404, 405})
        if "location" in r.headers:
            s.unexpected.append(f"redirect:{path}:Location {r.headers['location']}")


def slow_clients(t: Target, token: str, n: int = 8, interval: float = 3.0, horizon: float = 30.0) -> dict[str, Any]:
    """n slowloris heads, n slow bodies, n idle sockets: how many the server cut within ``horizon`` s."""
    result: dict[str, Any] = {"head_cut": 0, "body_cut": 0, "idle_cut": 0, "max_held_s": 0.0}
    lock = threading.Lock()

    def one(kind: str) -> None:
        t0 = time.monotonic()
        try:
            sock = socket.create_connection((t.host, t.port), timeout=interval + 2)
        except OSError:
            return
        parts: list[bytes]
        if kind == "head":
            parts = [b"GET /health HTTP/1.1\r\n"] + [b"X-Slow-%d: 1\r\n" % i for i in range(1000)]
        elif kind == "body":
            sock.sendall(b"POST /cancel HTTP/1.1\r\nHost: w\r\n" + _auth(token)
                         + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
            parts = [b" "] * 1000
        else:
            parts = []
        cut = False
        try:
            deadline = t0 + horizon
            while time.monotonic() < deadline:
                if parts:
                    sock.sendall(parts.pop(0))
                sock.settimeout(interval)
                try:
                    if sock.recv(4096) == b"":
                        cut = True
                        break
                    cut = True  # an answer (e.g. 408/400) and a close count as cut too
                    break
                except TimeoutError:
                    continue
        except OSError:
            cut = True
        finally:
            held = time.monotonic() - t0
            sock.close()
        with lock:
            if cut:
                result[f"{kind}_cut"] += 1
            result["max_held_s"] = max(result["max_held_s"], round(held, 1))

    threads = [threading.Thread(target=one, args=(k,)) for k in ("head", "body", "idle") for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(horizon + interval + 10)
    return result


def disclosure(t: Target, token: str, secrets: list[str]) -> dict[str, Any]:
    """Plan/commit probes that used to echo resolved paths, the PID or file bytes (defect 9)."""
    refs = ["/etc/passwd", "../../../etc/passwd", "file:///etc/shadow", "/proc/self/environ", "environ.gguf",
            "link.gguf", "secret.txt", "missing.gguf", ".", "shm:../x", "file://remote/x"]
    leaks: list[str] = []
    tried = 0
    with httpx.Client(base_url=t.url, headers={"authorization": f"Bearer {token}"}, timeout=60) as c:
        for ref in refs:
            for path, body in (("/worker/plan", {"model_ref": ref}), ("/worker/commit", {"model_ref": "m", "model_path": ref})):
                tried += 1
                r = c.post(path, json=body)
                text = r.text
                for secret in secrets:
                    if secret and secret in text:
                        leaks.append(f"{path} {ref!r}: {secret!r} in {text[:200]!r}")
    return {"tried": tried, "leaks": leaks}


def repeat_commits(t: Target, token: str, model_ref: str, digest: str) -> dict[str, Any]:
    """On a sealed worker: repeats naming another file, a wrong digest or streamed bytes must fail."""
    bad = [
        {"model_ref": model_ref, "model_path": "/etc/passwd"},
        {"model_ref": model_ref, "model_path": "../../../../etc/passwd"},
        {"model_ref": model_ref, "model_path": "file:///etc/hostname"},
        {"model_ref": "other", "model_path": model_ref, "expected_digest": "ab" * 32},
        {"model_ref": model_ref, "expected_digest": digest, "model_path": "/proc/self/environ"},
    ]
    accepted: list[str] = []
    with httpx.Client(base_url=t.url, headers={"authorization": f"Bearer {token}"}, timeout=300) as c:
        for body in bad:
            r = c.post("/worker/commit", json=body)
            if r.status_code < 400 or r.status_code >= 500:
                accepted.append(f"{body}: {r.status_code}")
        good = c.post("/worker/commit", json={"model_ref": model_ref, "expected_digest": digest}).status_code
    # 50 MB of random bytes claiming the sealed digest: refused before it is stored
    head = (f"POST /worker/commit?model_ref=garbage&expected_digest={digest} HTTP/1.1\r\nHost: w\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {50 * 2**20}\r\n\r\n").encode()
    status, _, body = raw_exchange(t, head + os.urandom(2**20))
    return {"accepted_bad": accepted, "good_repeat": good, "streamed_stored": not (400 <= status < 500),
            "streamed_status": status, "tried": len(bad) + 2}


def cancel_race(c: httpx.Client, s: Summary, rounds: int) -> None:
    """Start a job, cancel it at once, repeatedly: 200/202/404/409/503 only, never a 5xx."""
    for i in range(rounds):
        job = f"adv-race-{i}-{secrets.token_hex(3)}"
        done = threading.Event()

        def run(j: str = job) -> None:
            try:
                with c.stream("POST", "/worker/execute",
                              json={"prompt": f"{CANARY} race", "params": {"max_tokens": 8}, "job_id": j}) as r:
                    if r.status_code >= 400:
                        r.read()
                    s.check("cancel_race", f"execute{i}", r, allowed={200, 503})
                    for _ in r.iter_bytes():
                        pass
            except httpx.HTTPError:
                s.count("cancel_race")
            finally:
                done.set()

        th = threading.Thread(target=run)
        th.start()
        time.sleep(0.05 * (i % 4))
        s.check("cancel_race", f"cancel{i}", c.post("/cancel", json={"job_id": job}), allowed={202, 404})
        done.wait(120)
        th.join(1)


def alive(t: Target) -> bool:
    try:
        return httpx.get(f"{t.url}/health", timeout=10).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def log_leaks(log: Path, token: str) -> tuple[int, list[str]]:
    lines = log.read_text(errors="replace").splitlines()
    bad = [ln[:160] for ln in lines if CANARY in ln or token in ln or "race" in ln and CANARY in ln]
    non_json = []
    for ln in lines:
        try:
            json.loads(ln)
        except ValueError:
            non_json.append(ln[:160])
    return len(lines), bad + [f"non-JSON line: {x}" for x in non_json]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--token-file", required=True, type=Path)
    ap.add_argument("--log", type=Path, help="the worker's log file, to grep for leaks")
    ap.add_argument("--model-ref", help="the sealed model's name (repeat-commit attacks)")
    ap.add_argument("--model-sha256", help="the sealed model's digest")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    token = args.token_file.read_text().split()[0]
    t = Target.parse(args.url)
    s = Summary()
    t0 = time.monotonic()
    report: dict[str, Any] = {}
    with httpx.Client(base_url=t.url, headers={"authorization": f"Bearer {token}"}, timeout=300) as c:
        hostile_bodies(c, s, args.quick)
        bad_credentials(t, token, s)
        malformed_http(t, token, s)
        redirects(c, s)
        d = disclosure(t, token, secrets=[f"/proc/{x}" for x in range(2, 10)] + ["found b'", "resolves to"])
        s.count("disclosure", d["tried"])
        report["disclosure_leaks"] = d["leaks"]
        if args.model_ref and args.model_sha256:
            rc = repeat_commits(t, token, args.model_ref, args.model_sha256)
            s.count("repeat_commit", rc["tried"])
            report["repeat_commit"] = rc
            cancel_race(c, s, 4 if args.quick else 20)
        sc = slow_clients(t, token, n=4 if args.quick else 8, interval=3.0, horizon=20 if args.quick else 60)
        s.count("slow_clients", 3 * (4 if args.quick else 8))
        report["slow_clients"] = sc
    s.crashes = 0 if alive(t) else 1
    report.update({
        "cases_tried": s.tried, "families": s.families, "status_5xx": s.status_5xx, "crashes": s.crashes,
        "non_json_errors": s.non_json, "unexpected_status": s.unexpected, "seconds": round(time.monotonic() - t0, 1),
    })
    if args.log:
        n, leaks = log_leaks(args.log, token)
        report["log_lines"], report["log_leaks"] = n, leaks
    print(json.dumps(report, indent=2))
    failed = (s.status_5xx or s.crashes or s.non_json or report.get("log_leaks") or report["disclosure_leaks"]
              or s.unexpected or (report.get("repeat_commit") or {}).get("accepted_bad"))
    total_slow = sc["head_cut"] + sc["body_cut"] + sc["idle_cut"]
    print(f"SUMMARY: {s.tried} cases, {len(s.status_5xx)} 5xx, {s.crashes} crashes, {len(s.non_json)} non-JSON errors, "
          f"{len(s.unexpected)} unexpected statuses, {len(report.get('log_leaks', []))} log leaks "
          f"({report.get('log_lines', '?')} lines), {len(report['disclosure_leaks'])} disclosures, "
          f"slow clients cut {total_slow}/{3 * (4 if args.quick else 8)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
