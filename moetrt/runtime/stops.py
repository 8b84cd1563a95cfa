"""Stop strings on streamed text: cut the text before the stop string that starts first, never emitting any
part of it.

Text arrives in pieces (one per token) and a stop string may be split across pieces, so the tail of the
text that could still grow into a stop string is held back (at most max(len(stop)) - 1 characters) until
later pieces decide it; `flush` releases (or cuts) it when generation ends. A stop string found while a
longer one that would start earlier is still undecided waits for it, so the output is the same however the
text is split: the text before the first occurrence of any stop string. The stop string itself and
everything after it are dropped, as in the OpenAI API's `stop`.
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
        hit = self._first_match(text)
        pending = self._partial_start(text)  # a stop string may still start here: hold from here on
        if hit is not None and hit[0] <= pending:
            self.matched, self._held = hit[1], ""
            return text[: hit[0]]
        self._held = text[pending:]
        return text[:pending]

    def flush(self) -> str:
        """The held-back text at the end of the stream (cut before a stop string found in it)."""
        held, self._held = self._held, ""
        hit = self._first_match(held) if self.matched is None else None
        if hit is not None:
            self.matched = hit[1]
            return held[: hit[0]]
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(position, stop string) of the stop string that starts first in `text` (the longest on a tie)."""
        hits = [(text.find(stop), -len(stop), stop) for stop in self.stops if stop in text]
        return (min(hits)[0], min(hits)[2]) if hits else None

    def _partial_start(self, text: str) -> int:
        """The first position from which the rest of `text` is a proper prefix of some stop string
        (len(text) when there is none): what a later piece could still complete into a stop string."""
        for start in range(max(0, len(text) - self._longest + 1), len(text)):
            tail = text[start:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self.stops):
                return start
        return len(text)
