"""The small interface every runtime backend implements (Polygraphy-style: load, run a step, release).

A backend is one loaded engine (or the eager model) that owns static KV buffers
[max_batch, kv_heads, max_seq, head_dim] per layer, allocated once at load. Row s of every buffer is cache
SLOT s: a sequence lives in one slot for its whole life, and a step names the slots its batch rows use, so a
server can prefill one slot while others decode (continuous batching). The generation loop in
`moetrt.runtime.generate` drives any backend; nothing in it knows which one it runs. Graph I/O names are in
`moetrt.names`; the table of backends is `moetrt.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig


class Backend(Protocol):
    """One loaded engine with its static KV buffers; a context manager that closes it on exit."""

    name: str
    config: MixtralConfig
    max_batch: int
    max_seq_len: int

    @classmethod
    def load(
        cls,
        path: str | Path,
        max_batch: int | None = None,
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
    ) -> Backend:
        """Open the engine directory `path`. max_batch (cache slots) defaults to the manifest's; threads (CPU
        threads) to the engine's; extra_outputs are per-layer graph values (`moetrt.names`) returned in
        `extras` after each step. Raises MoetrtError (one line) for anything the backend cannot open."""
        ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, slots: Sequence[int] | None = None) -> np.ndarray:
        """Run one forward over int64 [B, T] tokens at their int64 [B, T] positions, batch row b living in
        cache slot `slots[b]` (distinct slots in [0, max_batch); default: slots 0..B-1), store the new K/V
        in those slots at those positions, and return float32 logits [B, T, vocab]. Each row's positions
        are consecutive and attend to its slot's positions before them; slots not named are untouched."""
        ...

    def kv_cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's K and V buffers [max_batch, kv_heads, max_seq, head_dim] (validation)."""
        ...

    def set_kv_cache(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Overwrite the first k.shape[0] slots of one layer's K and V buffers with host arrays
        [B, kv_heads, max_seq, head_dim] (cast to the buffers' dtype): validation runs an engine step over the
        caches the eager model filled, so a step's numbers are compared apart from cache bookkeeping."""
        ...

    def close(self) -> None:
        """Release the session/engine and its buffers."""
        ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...


class ClosingContext:
    """`with backend:` closes it on exit; mixed into every backend class (the only shared behaviour)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


def check_slots(slots: Sequence[int], batch: int, max_batch: int) -> list[int]:
    """`slots` as a list of `batch` distinct cache rows in [0, max_batch), or a one-line MoetrtError."""
    rows = [int(s) for s in slots]
    if len(rows) != batch or len(set(rows)) != batch or min(rows) < 0 or max(rows) >= max_batch:
        raise MoetrtError(f"slots {rows}: expected {batch} distinct cache slots in [0, {max_batch})")
    return rows
