"""OpenAI ``stop`` strings, matched on the detokenized text across token boundaries.

Text is released as soon as it can no longer be the start of a stop string:
only a suffix that is a proper prefix of some stop is held back, so a stream
stalls at most as long as a stop could still be forming. The stop text itself
is never released; what preceded it is.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped: str | None = None  # the stop string that matched

    def push(self, text: str) -> str:
        """Feed newly decoded text; returns what can be released now ("" after a stop)."""
        if self.stopped is not None:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        hit = self._first_hit(buf)
        if hit is not None:
            at, stop = hit
            # a longer stop starting earlier may still complete (stops "a" and "<a<" on "<a"): wait for it
            pending = next((q for q in range(at) if self._could_start(buf[q:])), None)
            if pending is None:
                self.stopped, self._held = stop, ""
                return buf[:at]
            self._held = buf[pending:]
            return buf[:pending]
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def _first_hit(self, buf: str) -> tuple[int, str] | None:
        hits = [(buf.find(s), s) for s in self._stops]
        return min(((i, s) for i, s in hits if i >= 0), default=None)

    def _could_start(self, tail: str) -> bool:
        """``tail`` (running to the end of the text so far) is a proper prefix of some stop."""
        return any(len(tail) < len(s) and s.startswith(tail) for s in self._stops)

    def _partial(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """End of generation: held text is released up to a stop it holds, else all of it."""
        out, self._held = self._held, ""
        if self.stopped is not None:
            return ""
        hit = self._first_hit(out)
        if hit is not None:
            self.stopped = hit[1]
            return out[: hit[0]]
        return out
