"""Server-Sent Events framing (SPEC 4246-4248).

A frame is ``event: <name>`` + one ``data: <json>`` line + a blank line. JSON
never contains a raw newline (json.dumps escapes it), so one data line always
suffices and token text cannot break the framing. Comments (``:`` lines) keep
idle connections alive through proxies while a long prompt prefills.
"""

from __future__ import annotations

import json
from typing import Any

EVENTS = ("started", "token", "metrics", "end", "error")
KEEPALIVE = b": keep-alive\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def frame(event: str, data: dict[str, Any]) -> bytes:
    if event not in EVENTS:
        raise ValueError(f"unknown SSE event {event!r}")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


def parse(stream: str) -> list[tuple[str, dict[str, Any]]]:
    """Inverse of ``frame`` for complete streams; comments are skipped (used by tests and clients)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for block in stream.split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        if event is not None:
            out.append((event, json.loads("\n".join(data))))
    return out
