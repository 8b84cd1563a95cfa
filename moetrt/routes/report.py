"""The `moetrt routes` report: per-layer statistics over prompt and generated tokens, and the comparison with a
second engine. Plain data (JSON-ready via `to_dict`); the table is drawn by the CLI, the heatmap by `plot`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moetrt.routes.stats import LayerComparison, LayerStats, compare_layer, layer_stats
from moetrt.routes.trace import RoutedSequence

PARTS = ("prompt", "generated")
DIVERGENCE = 0.9  # a layer "diverges" when fewer than this fraction of tokens get the same expert set


@dataclass(frozen=True)
class Comparison:
    engine: str
    backend: str
    layers: list[LayerComparison]
    threshold: float
    diverging_layer: int | None  # the first layer whose set agreement is below `threshold`


@dataclass(frozen=True)
class RoutesReport:
    engine: str
    backend: str
    num_experts: int
    top_k: int
    sequences: list[dict[str, Any]]  # label, prompt_tokens, generated_tokens
    layers: dict[str, list[LayerStats]]  # part ("prompt" | "generated") -> per layer
    compare: Comparison | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically (a temporary sibling renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        tmp.replace(path)
        return path


def summarize(engine: str, backend: str, num_experts: int, sequences: list[RoutedSequence]) -> RoutesReport:
    """Per-layer `layer_stats` over each part's tokens, every sequence's part a separate segment."""
    num_layers, _, top_k = sequences[0].expert_ids.shape
    layers = {
        part: [layer_stats([seq.part(part)[layer] for seq in sequences], num_experts) for layer in range(num_layers)]
        for part in PARTS
    }
    info = [{"label": s.label, "prompt_tokens": len(s.prompt), "generated_tokens": len(s.generated)} for s in sequences]
    return RoutesReport(engine, backend, num_experts, top_k, info, layers)


def compare(
    engine: str, backend: str, a: list[RoutedSequence], b: list[RoutedSequence], num_experts: int,
    threshold: float = DIVERGENCE,
) -> Comparison:  # fmt: skip
    """Per-layer agreement of two engines' routing of the same tokens (all of each sequence's tokens)."""
    ids_a = np.concatenate([s.expert_ids for s in a], axis=1)
    ids_b = np.concatenate([s.expert_ids for s in b], axis=1)
    layers = [compare_layer(ids_a[i], ids_b[i], num_experts) for i in range(len(ids_a))]
    diverging = next((i for i, layer in enumerate(layers) if layer.set_agreement < threshold), None)
    return Comparison(engine, backend, layers, threshold, diverging)
