"""Callbacks to the pool manager (SPEC "Callback", 4023, 4961).

``ready`` is mandatory when a callback URL is configured: it is retried with
exponential backoff (bounded attempts), and the worker accepts work only
after it succeeded. ``status`` reports a startup failure or a fatal error
just before exit; it is best-effort and never raises, since the process is
going down either way.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import httpx

from . import logs
from .errors import ErrorCode, WorkerError

READY_PATH = "/v2/internal/workers/ready"
STATUS_PATH = "/v2/internal/workers/status"


class CallbackError(WorkerError):
    """The pool manager could not be told the worker is ready; the worker must not serve."""

    code = ErrorCode.INTERNAL


class CallbackClient:
    def __init__(
        self,
        base_url: str,
        *,
        attempts: int = 6,
        timeout_sec: float = 5.0,
        backoff_initial_sec: float = 0.25,
        backoff_max_sec: float = 8.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self.timeout_sec = timeout_sec
        self.backoff_initial_sec = backoff_initial_sec
        self.backoff_max_sec = backoff_max_sec

    async def ready(self, body: dict[str, Any]) -> None:
        """POST the readiness report; raise CallbackError after the last failed attempt."""
        await self._post("ready", READY_PATH, body, self.attempts, raise_on_failure=True)

    async def status(self, body: dict[str, Any]) -> bool:
        """Best-effort status report (few attempts, short backoff); True if it was accepted."""
        return await self._post("status", STATUS_PATH, body, min(self.attempts, 3), raise_on_failure=False)

    def _delay(self, attempt: int) -> float:
        base = min(self.backoff_max_sec, self.backoff_initial_sec * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)  # jitter keeps a fleet from retrying in lockstep

    async def _post(self, kind: str, path: str, body: dict[str, Any], attempts: int, *, raise_on_failure: bool) -> bool:
        url = self.base_url + path
        last = "no attempt made"
        async with httpx.AsyncClient(timeout=self.timeout_sec, follow_redirects=False) as client:
            for attempt in range(1, attempts + 1):
                try:
                    resp = await client.post(url, json=body)
                except httpx.HTTPError as e:
                    last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                else:
                    if resp.status_code < 300:
                        logs.event(
                            "callback_ok", "The pool manager accepted the {callback} callback (attempt {attempt}).",
                            callback=kind, callback_url=url, attempt=attempt, status=resp.status_code,
                            code=body.get("error", {}).get("code") if kind == "status" else None,
                        )
                        return True
                    last = f"HTTP {resp.status_code}"
                    if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
                        break  # the pool manager refused the report itself; repeating it will not help
                if attempt < attempts:
                    delay = self._delay(attempt)
                    logs.event(
                        "callback_retry",
                        "The {callback} callback to the pool manager failed ({error}); retrying in {delay_ms:.0f} ms.",
                        level=logging.WARNING, callback=kind, callback_url=url, attempt=attempt,
                        delay_ms=round(delay * 1000), error=last,
                    )
                    await asyncio.sleep(delay)
        logs.event(
            "callback_failed", "Gave up on the {callback} callback after {attempts} attempts: {error}.",
            level=logging.ERROR, callback=kind, callback_url=url, attempts=attempts, error=last,
        )
        if raise_on_failure:
            raise CallbackError(f"readiness callback to {url} failed: {last}")
        return False
