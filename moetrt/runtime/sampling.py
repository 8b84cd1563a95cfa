"""Next-token selection from float32 logits [B, V]: greedy, or temperature / top-k / top-p sampling.

Everything is vectorised over the batch rows and runs on the host in numpy, once per decode step, so the
cost matters: top-k uses `argpartition` (O(V)), and top-p sorts only the most probable few hundred tokens
unless the nucleus is wider. Sampling draws one uniform number per
row from a seeded `numpy.random.Generator` and inverts the cumulative distribution, so a run is
reproducible from its seed (and the batch it ran in). The filters apply in transformers' order:
temperature, then top-k, then top-p on the renormalised top-k distribution.

Edges behave as their limits, never as NaN: probabilities are exp((logit - max) / temperature) in float64,
so the most probable token always has weight 1 and the others underflow to 0 as temperature -> 0 (greedy)
or approach 1 as temperature -> inf (uniform); top_p -> 0 keeps only the most probable token; top_k larger
than the vocabulary keeps all of it. A temperature that is not a finite number >= 0 is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moetrt.errors import MoetrtError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 means no limit; top_p 1 means no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature < math.inf:
            raise MoetrtError(
                f"sampling temperature must be a finite number >= 0 (0 = greedy), found {self.temperature}"
            )
        if self.top_k < 0:
            raise MoetrtError(f"sampling top_k must be >= 0 (0 = no limit), found {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise MoetrtError(f"sampling top_p must be in (0, 1], found {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()
NUCLEUS_SEARCH = (256, 4096)  # top-p looks for the nucleus among this many most probable tokens, then sorts all


def greedy(logits: np.ndarray) -> np.ndarray:
    """The highest-logit token per row [B] (ties: the lowest token id, numpy's argmax rule)."""
    return logits.argmax(axis=-1)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """One token per row [B] from logits [B, V], drawn with `rng` (unused when `params` is greedy).

    Exact ties at the k-th largest logit are broken arbitrarily but deterministically (argpartition's
    order), so the same logits and seed always give the same tokens.
    """
    if params.greedy:
        return greedy(logits)
    x = logits
    b, v = x.shape
    ids = None  # candidate token ids [B, C] once the candidates are a subset of the vocabulary, in x's order
    if 0 < params.top_k < v:
        ids = np.argpartition(x, v - params.top_k, axis=-1)[:, v - params.top_k :]
        x = np.take_along_axis(x, ids, axis=-1)
    # Unnormalised, the largest exactly 1: (x - max) <= 0 divided by any temperature > 0 is never NaN (a tiny
    # temperature overflows the others to -inf, whose exp is the 0 of the greedy limit).
    with np.errstate(over="ignore"):
        probs = np.exp((x - x.max(axis=-1, keepdims=True)).astype(np.float64) / params.temperature)
    total = probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        probs, ids = _nucleus_candidates(probs, ids, params.top_p * total)
        cdf = np.cumsum(probs, axis=-1)
        # Keep the shortest prefix (probabilities descending) whose mass reaches top_p: a token stays when the
        # mass before it is still below top_p. The first token always stays.
        kept = ((cdf - probs) < params.top_p * total).sum(axis=-1)
        mass = np.take_along_axis(cdf, kept[:, None] - 1, axis=-1)
    else:
        cdf = np.cumsum(probs, axis=-1)
        kept, mass = np.full(b, cdf.shape[1]), cdf[:, -1:]
    u = rng.random((b, 1), dtype=np.float32) * mass
    # The first index whose cumulative mass exceeds u; the clamp covers u rounding up to the full mass.
    choice = np.minimum((cdf <= u).sum(axis=-1), kept - 1)
    if ids is None:
        return choice
    return np.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


def _nucleus_candidates(
    probs: np.ndarray, ids: np.ndarray | None, nucleus_mass: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates sorted by probability, descending, with their token ids.

    A full sort of a 32k vocabulary costs ~10x a decode step's other host work, and the nucleus is
    usually a few tokens: when the `size` most probable candidates already hold the nucleus mass in every
    row, nothing past them can be kept, so only they are sorted.
    """
    for size in NUCLEUS_SEARCH:
        if probs.shape[1] <= size:
            break
        head = np.argpartition(probs, -size, axis=-1)[:, -size:]
        head_probs = np.take_along_axis(probs, head, axis=-1)
        if (head_probs.sum(axis=-1, keepdims=True) >= nucleus_mass).all():
            probs, ids = head_probs, head if ids is None else np.take_along_axis(ids, head, axis=-1)
            break
    order = np.argsort(-probs, axis=-1)
    probs = np.take_along_axis(probs, order, axis=-1)
    return probs, order if ids is None else np.take_along_axis(ids, order, axis=-1)
