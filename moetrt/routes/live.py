"""Live expert-load metrics for a server, in Prometheus' conventions (prometheus-client):

    moetrt_expert_tokens_total{layer, expert}  counter: (token, selected expert) assignments since start
    moetrt_expert_balancedness{layer}          gauge: mean / max of that layer's counts (1 = even; 1/E = one
                                               expert takes everything), the figure vLLM's EPLB reports

The server loads its backend with `ExpertLoad.outputs` as extra outputs and calls `observe(backend.extras)`
after each step, naming the rows that are real tokens (not padding, not a finished row riding along).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.names import expert_ids
from moetrt.routes.trace import routing_outputs


class ExpertLoad:
    """Per-layer expert counters, updated from a step's `layers.{i}.expert_ids` [tokens, k]."""

    def __init__(self, num_layers: int, num_experts: int, registry=None):
        """registry: a prometheus_client CollectorRegistry (default: the global one `/metrics` serves)."""
        from prometheus_client import REGISTRY, Counter, Gauge

        registry = REGISTRY if registry is None else registry
        self.num_layers, self.num_experts = num_layers, num_experts
        self.counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        tokens = Counter("moetrt_expert_tokens", "Tokens routed to each expert of each MoE layer (one per token and "
                         "selected expert)", ["layer", "expert"], registry=registry)  # fmt: skip
        balance = Gauge("moetrt_expert_balancedness", "Mean over max of a layer's per-expert token counts (1 = even)",
                        ["layer"], registry=registry)  # fmt: skip
        self._tokens = [[tokens.labels(layer=str(i), expert=str(e)) for e in range(num_experts)]
                        for i in range(num_layers)]  # fmt: skip
        self._balance = [balance.labels(layer=str(i)) for i in range(num_layers)]

    @property
    def outputs(self) -> list[str]:
        """The extra outputs to load the backend with."""
        return routing_outputs(self.num_layers)

    def observe(self, extras: Mapping[str, np.ndarray], rows: np.ndarray | None = None) -> None:
        """Count one step's routing. rows: the real token rows of the step's flattened [B*T] tokens (an index
        array or a bool mask; None: all of them)."""
        for layer in range(self.num_layers):
            name = expert_ids(layer)
            if name not in extras:
                raise MoetrtError(f"expert load: the step returned no {name}; load the backend with ExpertLoad.outputs")
            ids = np.asarray(extras[name])
            if rows is not None:
                ids = ids[rows]
            counts = np.bincount(ids.ravel(), minlength=self.num_experts)
            self.counts[layer] += counts
            for expert in np.flatnonzero(counts):
                self._tokens[layer][expert].inc(int(counts[expert]))
            top = self.counts[layer].max()
            if top:
                self._balance[layer].set(float(self.counts[layer].mean() / top))
