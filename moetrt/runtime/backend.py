"""The small interface every runtime backend implements (Polygraphy-style: load, run a step, release).

A backend is one loaded engine (or the eager model) that owns static KV buffers
[max_batch, kv_heads, max_seq, head_dim] per layer, allocated once at load. The generation loop in
`moetrt.runtime.generate` drives any backend; nothing in it knows which one it runs.

Graph I/O shared by the exporter and every engine (names fixed here, shapes in the export manifest):
    inputs   input_ids [batch, seq] int64, position_ids [batch, seq] int64,
             past_key.{i}, past_value.{i} [batch, kv_heads, max_seq, head_dim]   (read-only)
    outputs  logits [batch, seq, vocab], new_key.{i}, new_value.{i} [batch, kv_heads, seq, head_dim]
The runtime writes new_key/new_value into the static buffers at position_ids (`KVCache.write` semantics),
so no step copies a whole cache.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from moetrt.model.config import MixtralConfig

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOGITS = "logits"


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def new_key(layer: int) -> str:
    return f"new_key.{layer}"


def new_value(layer: int) -> str:
    return f"new_value.{layer}"


class Backend(Protocol):
    """One loaded engine with its static KV buffers."""

    name: str
    config: MixtralConfig
    max_batch: int
    max_seq_len: int

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run one forward over [B, T] tokens at their positions (B <= max_batch), store the new K/V in the
        static buffers at those positions, and return float32 logits [B, T, vocab]."""
        ...

    def kv_cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's K and V buffers [max_batch, kv_heads, max_seq, head_dim] (validation)."""
        ...

    def close(self) -> None:
        """Release the session/engine and its buffers."""
        ...
