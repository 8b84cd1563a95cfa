"""Expert-load statistics of one layer's routing, and the comparison of two engines' routing of the same tokens.

Inputs are the engines' own routing outputs (`layers.{i}.expert_ids` [tokens, k], best first), split into
SEGMENTS: runs of consecutive tokens of one sequence (a prompt, or the tokens generated after it), so
"consecutive" never spans two sequences or the prompt/generation boundary.

Figures, per layer:
    counts[e]      (token, slot) assignments to expert e; sum = tokens * k
    shares[e]      counts[e] / (tokens * k)
    balancedness   mean(counts) / max(counts): 1 = perfectly even; 1/E = one expert takes all. The figure
                   vLLM's expert-parallel load balancer (EPLB) logs.
    entropy_bits   Shannon entropy of `shares` in bits (log2 E when even)
    top_pairs      the most frequent unordered expert pairs a token selects together, with their share of tokens
    same_first     fraction of consecutive token pairs whose FIRST choice is the same expert
    same_any       fraction whose k-sets share at least one expert ("first or second choice" for k = 2)
                   -- the repetition rates of Jiang et al., "Mixtral of Experts" (arXiv 2401.04088), section 5,
                   Table 5, with their chance levels for uniform independent routing: 1/E and
                   1 - C(E-k, k) / C(E, k) (12.5% and 46% for Mixtral). `*_chance_load` is the chance level
                   given this layer's own load (tokens drawn independently from the observed first-choice and
                   k-set frequencies): a rate above it means consecutive tokens really do reuse experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOP_PAIRS = 3


@dataclass(frozen=True)
class LayerStats:
    tokens: int
    counts: list[int]
    shares: list[float]
    balancedness: float
    entropy_bits: float
    top_pairs: list[tuple[int, int, float]]  # (expert a < expert b, share of tokens selecting both)
    consecutive_pairs: int
    same_first: float
    same_first_chance: float
    same_first_chance_load: float
    same_any: float
    same_any_chance: float
    same_any_chance_load: float


@dataclass(frozen=True)
class LayerComparison:
    tokens: int
    set_agreement: float  # fraction of tokens whose k-sets are equal
    first_agreement: float  # fraction whose first choices are equal
    share_delta: list[float]  # per expert: share in B - share in A


def layer_stats(segments: Sequence[np.ndarray], num_experts: int) -> LayerStats:
    """The figures of the module docstring for one layer; segments are int [n_s, k] expert ids, best first."""
    ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in segments]) if segments else np.zeros((0, 1), int)
    tokens, k = ids.shape
    counts = np.bincount(ids.ravel(), minlength=num_experts)[:num_experts]
    total = counts.sum()
    shares = counts / total if total else np.zeros(num_experts)
    nonzero = shares[shares > 0]
    pairs = [(a[1:], a[:-1]) for a in (np.asarray(s, dtype=np.int64) for s in segments) if len(a) > 1]
    same_first = sum(int((nxt[:, 0] == prev[:, 0]).sum()) for nxt, prev in pairs)
    same_any = sum(int(_intersects(nxt, prev).sum()) for nxt, prev in pairs)
    consecutive = sum(len(nxt) for nxt, _ in pairs)
    return LayerStats(
        tokens=int(tokens),
        counts=counts.tolist(),
        shares=shares.tolist(),
        balancedness=float(counts.mean() / counts.max()) if total else 0.0,
        entropy_bits=float(-(nonzero * np.log2(nonzero)).sum()),
        top_pairs=_top_pairs(ids) if k > 1 else [],
        consecutive_pairs=consecutive,
        same_first=same_first / consecutive if consecutive else 0.0,
        same_first_chance=1.0 / num_experts,
        same_first_chance_load=_load_chance_first(ids, num_experts),
        same_any=same_any / consecutive if consecutive else 0.0,
        same_any_chance=1.0 - math.comb(num_experts - k, k) / math.comb(num_experts, k),
        same_any_chance_load=_load_chance_any(ids, num_experts),
    )


def compare_layer(a: np.ndarray, b: np.ndarray, num_experts: int) -> LayerComparison:
    """Two engines' expert ids [tokens, k] for the same tokens of one layer."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"expert ids of shapes {a.shape} and {b.shape}: expected the same tokens")
    tokens = len(a)
    same_set = (np.sort(a, axis=1) == np.sort(b, axis=1)).all(axis=1)
    share_a, share_b = (np.bincount(x.ravel(), minlength=num_experts) / max(x.size, 1) for x in (a, b))
    return LayerComparison(
        tokens=tokens,
        set_agreement=float(same_set.mean()) if tokens else 1.0,
        first_agreement=float((a[:, 0] == b[:, 0]).mean()) if tokens else 1.0,
        share_delta=(share_b - share_a).tolist(),
    )


def _intersects(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """bool [n]: row i of x and row i of y share an expert."""
    return (x[:, :, None] == y[:, None, :]).any(axis=(1, 2))


def _top_pairs(ids: np.ndarray) -> list[tuple[int, int, float]]:
    ordered = np.sort(ids, axis=1)
    a, b = np.triu_indices(ids.shape[1], 1)
    pairs = np.stack([ordered[:, a].ravel(), ordered[:, b].ravel()], axis=1)
    unique, counts = np.unique(pairs, axis=0, return_counts=True)
    best = np.lexsort((unique[:, 1], unique[:, 0], -counts))[:TOP_PAIRS]  # most frequent; ties: lower ids
    return [(int(unique[i, 0]), int(unique[i, 1]), float(counts[i] / len(ids))) for i in best]


def _load_chance_first(ids: np.ndarray, num_experts: int) -> float:
    if not len(ids):
        return 0.0
    p = np.bincount(ids[:, 0], minlength=num_experts) / len(ids)
    return float((p**2).sum())


def _load_chance_any(ids: np.ndarray, num_experts: int) -> float:
    if not len(ids):
        return 0.0
    sets, freq = np.unique(np.sort(ids, axis=1), axis=0, return_counts=True)
    member = np.zeros((len(sets), num_experts), dtype=np.float32)
    np.put_along_axis(member, sets, 1.0, axis=1)
    p = freq / len(ids)
    return float(p @ ((member @ member.T) > 0) @ p)
