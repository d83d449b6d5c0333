"""uvicorn's h11 protocol with the limits a daemon facing untrusted clients needs (issue 10, 5 and 7).

uvicorn bounds only the idle time after a response (``timeout_keep_alive``). A
client that opens a socket and sends nothing, or one header line or body byte
every few seconds (slowloris), held a connection for as long as it liked. Per
connection, a one-second tick now enforces:

* the request head (request line + headers) complete within ``HEADER_TIMEOUT_S``
  of the connection opening or of the previous response ending (this also
  bounds idle sockets that never send a byte);
* a request body arriving at ``MIN_BODY_RATE`` bytes/s on average once it has
  had ``BODY_GRACE_S`` (a streamed commit at any real network speed passes; one
  byte every 3 s does not). Time the server itself stops reading (backpressure)
  is not held against the client;
* at most ``MAX_CONNECTIONS`` open connections: one over is answered 503
  ``WORKER_BUSY`` and closed before it is read.

A request h11 cannot parse (bad Content-Length, bad chunk size, NUL in the
target or a header, HTTP/0.9) is answered in the documented JSON error shape
(400 ``INVALID_PARAMS``) instead of uvicorn's ``text/plain`` line, and closed.

Each request's scope also carries a ``DirectBody`` (``scope["extensions"][DIRECT_BODY]``): the
SSE streams write token frames through it from the loop callback that hands over an engine step
(http/stream.py), instead of a task wake-up, two async generators and five ASGI ``send``
wrappers per token (the HTTP side's per-token cost bounds small models at 64 clients).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import logs
from ..errors import ErrorCode, WorkerError

HEADER_TIMEOUT_S = 10.0
BODY_GRACE_S = 10.0
MIN_BODY_RATE = 16 * 1024  # bytes/s, averaged over the body's reading time
MAX_CONNECTIONS = 256
_TICK_S = 1.0
DIRECT_BODY = "worker_orcd.direct_body"


class DirectBody:
    """A started streaming response's body chunks, written as uvicorn's ``send`` writes a
    ``http.response.body`` message with ``more_body`` (the same h11 event, the same bytes).

    ``ready`` is false whenever ``send`` would have to wait or refuse: before the response
    started, after it completed, once the client is gone, while the transport is paused for
    backpressure; the caller then takes the ordinary path (its inbox and ``send``)."""

    __slots__ = ("_protocol", "_cycle")

    def __init__(self, protocol: WorkerH11Protocol, cycle: Any) -> None:
        self._protocol = protocol
        self._cycle = cycle

    def ready(self) -> bool:
        p, c = self._protocol, self._cycle
        return (p.cycle is c and c.response_started and not c.response_complete and not c.disconnected
                and not p.flow.write_paused and not p.transport.is_closing() and c.scope["method"] != "HEAD")

    def write(self, body: bytes) -> None:
        """Only after ``ready()`` on the same loop turn."""
        p = self._protocol
        p.transport.write(p.conn.send(h11.Data(data=body)))


def _error_bytes(err: WorkerError) -> bytes:
    return json.dumps(err.to_dict(), separators=(",", ":")).encode()


class WorkerH11Protocol(H11Protocol):
    """One connection; see the module docstring for the limits it adds."""

    _tick: asyncio.TimerHandle | None = None
    _idle_since = 0.0  # waiting for a request head since (monotonic)
    _body_since: float | None = None  # reading a body since
    _body_bytes = 0
    _paused_s = 0.0  # reading time paused by the server, not the client

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = time.monotonic()
        if len(self.connections) > MAX_CONNECTIONS:
            logs.event(
                "connection_refused", "Refused a connection: {connections} connections are open; the cap is {max_connections}.",
                connections=len(self.connections), max_connections=MAX_CONNECTIONS,
            )
            err = WorkerError(f"too many open connections (the cap is {MAX_CONNECTIONS})", code=ErrorCode.WORKER_BUSY)
            self._send_error(503, err)
            return
        self._tick = self.loop.call_later(_TICK_S, self._check)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not cycle:  # a request began: its app task has not run yet
            self.cycle.scope.setdefault("extensions", {})[DIRECT_BODY] = DirectBody(self, self.cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.SEND_BODY:
            self._body_bytes += len(data)
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY and self._body_since is None:
            self._body_since, self._body_bytes, self._paused_s = time.monotonic(), 0, 0.0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._idle_since = time.monotonic()
        self._body_since = None

    def _check(self) -> None:
        """The per-connection tick: cut a client that is too slow to send its request."""
        self._tick = None
        if self.transport.is_closing():
            return
        now = time.monotonic()
        state = self.conn.their_state
        waiting_head = state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if waiting_head and now - self._idle_since > HEADER_TIMEOUT_S:
            self._cut("request head", HEADER_TIMEOUT_S)
            return
        if state is h11.SEND_BODY and self._body_since is not None:
            if self.flow.read_paused:
                self._paused_s += _TICK_S
            spent = now - self._body_since - self._paused_s
            if spent > BODY_GRACE_S and self._body_bytes < MIN_BODY_RATE * spent:
                self._cut("request body", spent)
                return
        self._tick = self.loop.call_later(_TICK_S, self._check)

    def _cut(self, what: str, after: float) -> None:
        logs.event(
            "slow_client", "Closed a connection whose {reason} was still incomplete after {duration_ms:.0f} ms.",
            reason=what, duration_ms=round(after * 1000),
        )
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (h11 could not parse it): the JSON error shape, then close."""
        err = WorkerError("malformed HTTP request", code=ErrorCode.INVALID_PARAMS)
        self._send_error(400, err)

    def _send_error(self, status: int, err: WorkerError) -> None:
        body = _error_bytes(err)
        head = (
            f"HTTP/1.1 {status} {'Bad Request' if status == 400 else 'Service Unavailable'}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n"
            + (f"retry-after: {max(1, (err.retry_after_ms or 1000) // 1000)}\r\n" if status == 503 else "")
            + "\r\n"
        ).encode()
        # Written raw: h11's state machine may be in ERROR (it could not parse the request).
        self.transport.write(head + body)
        self.transport.close()
