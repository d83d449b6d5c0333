"""A small real HTTP server standing in for the pool manager: it receives the worker's callbacks.

It records every POST (path, JSON body, arrival time) and, on a readiness
callback, immediately probes the worker's ``{uri}/health`` before answering,
which proves the worker was already listening when it called back.
Responses can be scripted per path (e.g. fail the first N attempts).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

READY_PATH = "/v2/internal/workers/ready"
STATUS_PATH = "/v2/internal/workers/status"


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    at: float  # time.monotonic() on arrival
    health_status: int | None = None  # result of probing {uri}/health during a ready callback
    health_body: dict[str, Any] | None = None


@dataclass
class CallbackServer:
    host: str = "127.0.0.1"
    received: list[Received] = field(default_factory=list)
    # path -> list of status codes to answer, consumed in order; 200 once exhausted
    script: dict[str, list[int]] = field(default_factory=dict)
    probe_health: bool = True

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Condition(self._lock)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode("latin-1")}
                item = Received(self.path, body, time.monotonic())
                if self.path == READY_PATH and server.probe_health and isinstance(body, dict) and body.get("uri"):
                    item.health_status, item.health_body = _probe(str(body["uri"]) + "/health")
                with server._lock:
                    codes = server.script.get(self.path, [])
                    status = codes.pop(0) if codes else 200
                    server.received.append(item)
                    server._event.notify_all()
                payload = json.dumps({"ok": status < 300}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="callback-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def wait_for(self, path: str, timeout: float, count: int = 1) -> list[Received]:
        """Block until ``count`` callbacks to ``path`` arrived; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                got = [r for r in self.received if r.path == path]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {path} callback within {timeout} s (got {[r.path for r in self.received]})")
                self._event.wait(left)

    def of(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]


def _probe(url: str) -> tuple[int | None, dict[str, Any] | None]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:
        return None, None
