"""Stop strings on streamed text: cut the text at the first stop string, never emitting any part of it.

Text arrives in pieces (one per token) and a stop string may be split across pieces, so the tail of the
text that could still grow into a stop string is held back (at most max(len(stop)) - 1 characters) until
the next piece decides it; `flush` releases it when generation ends without a match. The stop string
itself and everything after it are dropped, as in the OpenAI API's `stop`.
"""

from __future__ import annotations

from collections.abc import Sequence

from moetrt.errors import MoetrtError


class StopMatcher:
    """One stream's stop-string state: `push` each text piece, emit what it returns, then `flush` at the end."""

    def __init__(self, stops: Sequence[str]):
        if any(not isinstance(stop, str) or not stop for stop in stops):
            raise MoetrtError("stop: expected non-empty strings")
        self.stops = tuple(dict.fromkeys(stops))
        self.matched: str | None = None  # the stop string found, once one is
        self._held = ""
        self._longest = max((len(stop) for stop in self.stops), default=0)

    def push(self, text: str) -> str:
        """The text that is safe to emit now. After a stop string is found: "" (and `matched` is set)."""
        if self.matched is not None:
            return ""
        text = self._held + text
        found = [(text.find(stop), stop) for stop in self.stops if stop in text]
        if found:
            position, self.matched = min(found, key=lambda hit: (hit[0], -len(hit[1])))
            self._held = ""
            return text[:position]
        hold = self._partial_suffix(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The held-back text, at the end of a stream in which no stop string was found."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """The length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0
