"""Stop strings over streamed text: text that might begin a stop string is held back until it cannot.

A stop string can arrive split over several tokens ("\\n\\nUser" as "\\n", "\\nUs", "er"), so text is only
released once no stop string can start inside it: after each piece, the longest suffix of the unreleased
text that is a prefix of some stop string stays held. When a stop string completes, the text before its
first occurrence is released and the rest (the stop string included) never is, as in the OpenAI API. At
the end of a generation that did not stop on a string, `flush` releases what was held.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces with `push`; each returns (text safe to release, whether a stop string matched)."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held, self.stopped = "", True
            return text[: min(hits)], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held text, released because the generation ended without completing a stop string."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
