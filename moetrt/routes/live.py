"""Live expert-load metrics for a server, in Prometheus' conventions (prometheus-client):

    moetrt_expert_tokens_total{layer, expert}  counter: (token, selected expert) assignments since start
    moetrt_expert_balancedness{layer}          gauge: mean / max of that layer's counts (1 = even; 1/E = one
                                               expert takes everything), the figure vLLM's EPLB reports

The server loads its backend with `ExpertLoad.outputs` as extra outputs and calls `observe(backend.extras)`
after each step, naming the rows that are real tokens (not padding, not a finished row riding along).

`observe` only adds one step's counts into a [layers, experts] array (one bincount); the metrics are made
from that array when Prometheus scrapes (a custom collector, the client library's pattern for state kept
elsewhere), so the decode loop never pays for L x E metric children.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.names import expert_ids
from moetrt.routes.trace import routing_outputs


class ExpertLoad:
    """Per-layer expert counters, updated from a step's `layers.{i}.expert_ids` [tokens, k]."""

    def __init__(self, num_layers: int, num_experts: int, registry=None):
        """Registers itself with `registry`, a prometheus_client CollectorRegistry (default: the global one)."""
        from prometheus_client import REGISTRY

        self.num_layers, self.num_experts = num_layers, num_experts
        self.counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._offsets = (np.arange(num_layers) * num_experts)[:, None]
        self._lock = threading.Lock()
        (REGISTRY if registry is None else registry).register(self)

    @property
    def outputs(self) -> list[str]:
        """The extra outputs to load the backend with."""
        return routing_outputs(self.num_layers)

    def observe(self, extras: Mapping[str, np.ndarray], rows: np.ndarray | None = None) -> None:
        """Count one step's routing. rows: the real token rows of the step's flattened [B*T] tokens (an index
        array or a bool mask; None: all of them)."""
        try:
            ids = np.stack([np.asarray(extras[expert_ids(layer)]) for layer in range(self.num_layers)])
        except KeyError as err:
            raise MoetrtError(f"expert load: the step returned no {err.args[0]}; load the backend with "
                              "ExpertLoad.outputs") from None  # fmt: skip
        if rows is not None:
            ids = ids[:, rows]
        flat = (ids.reshape(self.num_layers, -1) + self._offsets).ravel()
        counts = np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
        with self._lock:
            self.counts += counts

    def collect(self) -> Iterator[object]:
        """prometheus_client's collector protocol: the two metric families from the counts so far."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            counts = self.counts.copy()
        tokens = CounterMetricFamily("moetrt_expert_tokens", "Tokens routed to each expert of each MoE layer "
                                     "(one per token and selected expert)", labels=["layer", "expert"])  # fmt: skip
        balance = GaugeMetricFamily("moetrt_expert_balancedness", "Mean over max of a layer's per-expert token "
                                    "counts (1 = even)", labels=["layer"])  # fmt: skip
        for layer, row in enumerate(counts):
            for expert, count in enumerate(row.tolist()):
                tokens.add_metric([str(layer), str(expert)], count)
            top = row.max()
            balance.add_metric([str(layer)], float(row.mean() / top) if top else float("nan"))
        yield tokens
        yield balance
