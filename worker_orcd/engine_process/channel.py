"""One end of the socket between the worker and its engine process: calls both ways, one-way notes.

Written on ``multiprocessing.connection.Connection`` (length-prefixed pickles over a Unix socket
pair) rather than gRPC or ZeroMQ: both ends are this package, on one host, and the hot path is one
small message per engine step. A reader thread receives everything: a reply completes its
call, a note runs its handler on the reader thread (handlers must not block), a call from the
other side runs on a thread of its own (it may block: a load, a seal check). When the other end
goes away every pending call fails and ``on_closed`` runs once.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..errors import ErrorCode, WorkerError
from .wire import decode_error, encode_error

log = logging.getLogger("worker_orcd.engine_process")

Handler = Callable[..., Any]


class _Call:
    __slots__ = ("done", "ok", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.value: Any = None


class Channel:
    """Calls (``call``: blocks for the other side's answer), notes (``note``: fire and forget)."""

    def __init__(
        self,
        conn: Connection,
        *,
        calls: dict[str, Handler],
        notes: dict[str, Handler],
        on_closed: Callable[[], None] | None = None,
        idle: Callable[[], None] | None = None,
        idle_s: float = 0.05,
        name: str = "engine-channel",
    ) -> None:
        self._conn = conn
        self._calls = calls
        self._notes = notes
        self._on_closed = on_closed
        self._idle = idle  # runs on the reader thread when nothing arrived for idle_s (cancel polls)
        self._idle_s = idle_s
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Call] = {}
        self._pending_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        """The reader still runs (``join`` waits for it to end)."""
        return self._thread.is_alive()

    def note(self, kind: str, *args: Any) -> None:
        """Send a one-way message; lost silently once the other side is gone (its end is reported)."""
        try:
            with self._send_lock:
                self._conn.send((0, kind, args))
        except (OSError, ValueError, EOFError):
            pass

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Run ``method`` on the other side and return its result (or raise its WorkerError)."""
        cid = next(self._ids)
        pending = _Call()
        with self._pending_lock:
            if self._closed:
                raise _gone()
            self._pending[cid] = pending
        try:
            with self._send_lock:
                self._conn.send((cid, method, args))
        except (OSError, ValueError, EOFError):
            with self._pending_lock:
                self._pending.pop(cid, None)
            raise _gone() from None
        if not pending.done.wait(timeout):
            with self._pending_lock:
                self._pending.pop(cid, None)
            raise WorkerError(f"the engine process did not answer {method} within {timeout:g} s",
                              code=ErrorCode.INTERNAL)
        if pending.ok:
            return pending.value
        raise decode_error(pending.value)

    def close(self) -> None:
        """Both directions end now: the other side's reader (and ours, if blocked) sees the end."""
        try:
            s = socket.socket(fileno=os.dup(self._conn.fileno()))
            try:
                s.shutdown(socket.SHUT_RDWR)
            finally:
                s.close()
        except OSError:
            pass
        try:
            self._conn.close()
        except OSError:
            pass

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --- the reader ------------------------------------------------------------------------

    def _read(self) -> None:
        conn = self._conn
        try:
            while True:
                if self._idle is not None and not conn.poll(self._idle_s):
                    self._idle()
                    continue
                cid, kind, args = conn.recv()
                if cid == 0:
                    self._notes[kind](*args)
                elif cid > 0:
                    threading.Thread(target=self._serve, args=(cid, kind, args), name=f"engine-call-{kind}",
                                     daemon=True).start()
                else:
                    self._answer(-cid, kind, args)
        except (EOFError, OSError):
            pass
        except BaseException:  # noqa: BLE001 - a broken message ends the channel, loudly, never silently
            log.exception("engine channel: cannot read a message; closing")
        finally:
            self._shut()

    def _answer(self, cid: int, status: str, args: Any) -> None:
        with self._pending_lock:
            pending = self._pending.pop(cid, None)
        if pending is None:
            return  # its caller gave up (timeout)
        pending.ok, pending.value = status == "ok", args
        pending.done.set()

    def _serve(self, cid: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            value = self._calls[method](*args)
            reply: tuple[int, str, Any] = (-cid, "ok", value)
        except BaseException as e:  # noqa: BLE001 - every failure crosses back as a typed error
            if not isinstance(e, WorkerError):
                log.exception("engine channel: %s failed", method)
            reply = (-cid, "err", encode_error(e))
        try:
            with self._send_lock:
                self._conn.send(reply)
        except (OSError, ValueError, EOFError):
            pass

    def _shut(self) -> None:
        with self._pending_lock:
            self._closed = True
            pending, self._pending = self._pending, {}
        err = encode_error(_gone())
        for p in pending.values():
            p.ok, p.value = False, err
            p.done.set()
        if self._on_closed is not None:
            try:
                self._on_closed()
            except Exception:  # noqa: BLE001
                log.exception("engine channel: on_closed failed")


def _gone() -> WorkerError:
    return WorkerError("the engine process exited", code=ErrorCode.INTERNAL)
