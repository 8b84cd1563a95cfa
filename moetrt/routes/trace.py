"""Run a backend over prompts one sequence at a time and keep every layer's selected experts for every token.

A sequence is its prompt (one prefill step) followed by generated tokens, each fed in its own decode step,
so the routing of a generated token is the one the engine computed when it decoded it. Tokens are either
chosen greedily (the first engine) or FORCED (a second engine replaying the first one's tokens: the same
inputs, step by step, so a comparison of the two sees only their routing differences). A sequence stops
after `max_new_tokens` tokens or after feeding a stop token. The engine returns the routing as the extra
outputs `layers.{i}.expert_ids` (moetrt.names): no router is recomputed on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.names import expert_ids
from moetrt.runtime.backend import Backend
from moetrt.runtime.sampling import GREEDY, sample


@dataclass(frozen=True)
class RoutedSequence:
    label: str
    prompt: list[int]
    generated: list[int]  # tokens fed after the prompt
    expert_ids: np.ndarray  # int64 [layers, prompt + generated tokens, k], best first

    def part(self, name: str) -> np.ndarray:
        """[layers, n, k] for the "prompt" or "generated" tokens."""
        n = len(self.prompt)
        return {"prompt": self.expert_ids[:, :n], "generated": self.expert_ids[:, n:]}[name]


def routing_outputs(num_layers: int) -> list[str]:
    """The extra outputs a backend must be loaded with for `trace_sequence` (and the live counters)."""
    return [expert_ids(layer) for layer in range(num_layers)]


def trace_sequence(
    backend: Backend,
    label: str,
    prompt: list[int],
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    forced: list[int] | None = None,
) -> RoutedSequence:
    """Prefill `prompt` in cache slot 0, then feed up to `max_new_tokens` tokens: greedy from the logits, or
    `forced` (which sets the count). The backend must have been loaded with `routing_outputs`."""
    layers = routing_outputs(backend.config.num_hidden_layers)
    n_new = len(forced) if forced is not None else max_new_tokens
    if len(prompt) + n_new > backend.max_seq_len:
        raise MoetrtError(
            f"{label}: {len(prompt)} tokens + {n_new} new tokens exceed the engine's max sequence length "
            f"{backend.max_seq_len}"
        )
    stops = frozenset(stop_token_ids)

    def routing() -> np.ndarray:
        missing = [name for name in layers if name not in backend.extras]
        if missing:
            raise MoetrtError(f"backend {backend.name!r} returned no {missing[0]}; load it with routing_outputs")
        return np.stack([backend.extras[name] for name in layers])

    logits = backend.step(np.asarray([prompt], dtype=np.int64), np.arange(len(prompt), dtype=np.int64)[None])
    steps = [routing()]
    generated: list[int] = []
    rng = np.random.default_rng(0)
    for i in range(n_new):
        token = forced[i] if forced is not None else int(sample(logits[:, -1], GREEDY, rng)[0])
        position = len(prompt) + i
        logits = backend.step(np.asarray([[token]], dtype=np.int64), np.asarray([[position]], dtype=np.int64))
        steps.append(routing())
        generated.append(token)
        if forced is None and token in stops:
            break
    return RoutedSequence(label, list(prompt), generated, np.concatenate(steps, axis=1).astype(np.int64))
