"""Polygraphy runners for the two sides of a validation: the eager reference and the engine's graph.

Both take the same feed dicts (input_ids, position_ids, past_key.{i}, past_value.{i}) and return outputs
under the same names, so Polygraphy's Comparator pairs them by name:
    logits, new_key.{i}, new_value.{i}                      the graph outputs
    layers.{i}.moe_input, layers.{i}.moe_output [T, H]       each TopKMoE node's input and output
    layers.{i}.router_logits [T, E]                          when the engine has them (ORT's router MatMul)
The per-layer values are what let a failure name the first layer that diverges.

`EagerRunner` exists because Polygraphy 0.53's PytRunner cannot run on CPU (it calls `.cuda()`, casts with
Polygraphy dtypes and returns a tuple); it captures the MoE blocks' inputs and outputs with forward hooks
instead of changing the model.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata

from moetrt import names as io
from moetrt.errors import MoetrtError
from moetrt.model.mixtral import Mixtral
from moetrt.names import moe_input, moe_output, router_logits
from moetrt.runtime.backend import Backend
from moetrt.runtime.engine import load_backend


def layer_values(num_layers: int) -> list[str]:
    """The intermediate values validation asks an engine for, in layer order."""
    return [name(i) for i in range(num_layers) for name in (moe_input, moe_output, router_logits)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A contiguous host array (Polygraphy's comparison views it); float32 for bfloat16, which numpy lacks."""
    return np.ascontiguousarray((t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy())


class EagerRunner(BaseRunner):
    """Runs one functional forward of the eager `Mixtral` per feed dict (caches are inputs, nothing is kept)."""

    def __init__(self, model: Mixtral, max_seq_len: int, name: str = "eager"):
        super().__init__(name=name)
        self.model = model
        self.max_seq_len = max_seq_len

    def activate_impl(self) -> None:
        self._captured: dict[str, np.ndarray] = {}
        self._hooks = [
            layer.block_sparse_moe.register_forward_hook(self._capture(i)) for i, layer in enumerate(self.model.layers)
        ]

    def _capture(self, layer: int) -> Callable[..., None]:
        def hook(block: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            flat = args[0].reshape(-1, args[0].shape[-1])
            self._captured[moe_input(layer)] = to_numpy(flat)
            self._captured[moe_output(layer)] = to_numpy(output.reshape(flat.shape))
            self._captured[router_logits(layer)] = to_numpy(flat @ block.gate.weight.t())  # the contract's logits

        return hook

    def get_input_metadata_impl(self) -> TensorMetadata:
        cfg = self.model.config
        meta = TensorMetadata()
        meta.add(io.INPUT_IDS, np.int64, (None, None))
        meta.add(io.POSITION_IDS, np.int64, (None, None))
        cache_dtype = to_numpy(torch.zeros(0, dtype=self.model.embed_tokens.weight.dtype)).dtype
        shape = (None, cfg.num_key_value_heads, self.max_seq_len, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            meta.add(io.past_key(i), cache_dtype, shape)
            meta.add(io.past_value(i), cache_dtype, shape)
        return meta

    @torch.inference_mode()
    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        cfg, dtype = self.model.config, self.model.embed_tokens.weight.dtype
        layers = range(cfg.num_hidden_layers)

        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(feed_dict[name]))

        k = [tensor(io.past_key(i)).to(dtype) for i in layers]
        v = [tensor(io.past_value(i)).to(dtype) for i in layers]
        start = time.perf_counter()
        logits, new_k, new_v = self.model(tensor(io.INPUT_IDS), tensor(io.POSITION_IDS), k, v)
        self.inference_time = time.perf_counter() - start
        out = OrderedDict({io.LOGITS: to_numpy(logits)})
        for i in layers:
            out[io.new_key(i)] = to_numpy(new_k[i])
            out[io.new_value(i)] = to_numpy(new_v[i])
        out.update((name, self._captured.pop(name)) for name in layer_values(cfg.num_hidden_layers))
        return out

    def deactivate_impl(self) -> None:
        for hook in self._hooks:
            hook.remove()
        del self._hooks, self._captured


@dataclass
class EngineUnderTest:
    """What validation needs from an engine: a stateless Polygraphy runner over its graph (feed dicts in,
    graph outputs and per-layer values out) and a loader for its runtime backend (which owns the caches)."""

    name: str
    precision: str  # a key of moetrt.validate.tolerances.TOLERANCES
    dtype: str  # activation dtype the eager reference runs in
    max_seq_len: int
    runner: BaseRunner
    load_backend: Callable[[int], Backend]  # max_batch -> a fresh backend


def precision_of(manifest: dict[str, Any]) -> str:
    """The tolerance row of an engine: its weight precision when quantized, else its activation dtype."""
    precision = manifest.get("precision", "fp32")
    if precision in ("int8", "int4"):
        return precision
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[manifest["dtype"]]


def open_ort_engine(engine_dir: Path, manifest: dict[str, Any]) -> EngineUnderTest:
    """An ORT engine: its graph with the per-layer values it has declared as extra outputs, in a session
    configured like the one it is served with (moetrt.runtime.ort_session), under Polygraphy's OnnxrtRunner."""
    from moetrt.runtime.ort_session import add_graph_outputs, create_session

    graph = onnx.load(str(engine_dir / "model.onnx"), load_external_data=False).graph
    produced = {name for node in graph.node for name in node.output}
    wanted = layer_values(manifest["config"]["num_hidden_layers"])
    extras = [name for name in wanted if name in produced]
    missing = [name for name in wanted if name not in produced and not name.endswith(".router_logits")]
    if missing:
        raise MoetrtError(f"{engine_dir / 'model.onnx'}: no value {missing[0]!r}; rebuild the engine from an export")
    model = add_graph_outputs(engine_dir / "model.onnx", extras)
    session = create_session(engine_dir, manifest.get("threads"), manifest.get("device", "cpu"), model=model)
    return EngineUnderTest(
        name=f"ort engine {engine_dir}",
        precision=precision_of(manifest),
        dtype=manifest["dtype"],
        max_seq_len=int(manifest["max_seq_len"]),
        runner=OnnxrtRunner(session, name="engine"),
        load_backend=lambda max_batch: load_backend(engine_dir, max_batch=max_batch),
    )
