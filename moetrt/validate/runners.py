"""Polygraphy runners for the two sides of a validation: the eager reference and any registered backend.

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
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from moetrt import names as io
from moetrt.model.config import MixtralConfig
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


def cache_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of the caches in feed dicts: the engine's, with bfloat16 carried as float32."""
    return np.dtype({"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}[dtype])


def feed_metadata(config: MixtralConfig, max_seq_len: int, cache_dtype: np.dtype) -> TensorMetadata:
    """The feed dicts' names, dtypes and shapes (moetrt.validate.inputs builds them): ids, positions, caches."""
    meta = TensorMetadata()
    meta.add(io.INPUT_IDS, np.int64, (None, None))
    meta.add(io.POSITION_IDS, np.int64, (None, None))
    shape = (None, config.num_key_value_heads, max_seq_len, config.head_dim)
    for i in range(config.num_hidden_layers):
        meta.add(io.past_key(i), cache_dtype, shape)
        meta.add(io.past_value(i), cache_dtype, shape)
    return meta


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
        cache_dtype = to_numpy(torch.zeros(0, dtype=self.model.embed_tokens.weight.dtype)).dtype
        return feed_metadata(self.model.config, self.max_seq_len, cache_dtype)

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


class BackendRunner(BaseRunner):
    """Runs any registered backend (`moetrt.registry`) as a stateless graph: per feed dict, the feed's caches
    are written into the backend's first slots (`Backend.set_kv_cache`), then one `step`; it returns the
    logits, the step's new K/V read back from the buffers at its positions, and the per-layer values the
    backend was asked for (`extras`). The backend is opened on the first feed for that feed's batch."""

    def __init__(self, open_backend: Callable[[int], Backend], metadata: TensorMetadata, name: str = "engine"):
        super().__init__(name=name)
        self.open_backend = open_backend
        self.metadata = metadata
        self.backend: Backend | None = None

    def activate_impl(self) -> None:
        self.backend = None

    def get_input_metadata_impl(self) -> TensorMetadata:
        return self.metadata

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        ids, pos = feed_dict[io.INPUT_IDS], feed_dict[io.POSITION_IDS]
        b = ids.shape[0]
        if self.backend is None or self.backend.max_batch < b:
            self.deactivate_impl()
            self.backend = self.open_backend(b)
        backend = self.backend
        layers = range(backend.config.num_hidden_layers)
        for i in layers:
            backend.set_kv_cache(i, feed_dict[io.past_key(i)], feed_dict[io.past_value(i)])
        start = time.perf_counter()
        logits = backend.step(ids, pos)
        self.inference_time = time.perf_counter() - start
        out = OrderedDict({io.LOGITS: logits})
        at = pos[:, None, :, None]
        for i in layers:
            k, v = backend.kv_cache(i)
            out[io.new_key(i)] = np.take_along_axis(k[:b], at, axis=2)
            out[io.new_value(i)] = np.take_along_axis(v[:b], at, axis=2)
        out.update(getattr(backend, "extras", {}))
        return out

    def deactivate_impl(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend = None


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


def validation_values(manifest: dict[str, Any]) -> list[str]:
    """The per-layer values to ask an engine for: every TopKMoE node's input and output (every export names
    them), and its router logits when the engine's manifest lists them (ORT's router MatMul); without them
    the routing check recomputes the logits from the engine's MoE inputs."""
    layers = range(manifest["config"]["num_hidden_layers"])
    has_logits = set(manifest.get("io", {}).get("router_logits", {}))
    return [name(i) for i in layers for name in (moe_input, moe_output, router_logits)
            if name is not router_logits or router_logits(i) in has_logits]  # fmt: skip


def open_backend_engine(engine_dir: Path, manifest: dict[str, Any]) -> EngineUnderTest:
    """Any registered backend's engine: a `BackendRunner` over the backend opened with the per-layer values
    validation compares, and a plain loader for the runtime pass."""
    extras = validation_values(manifest)
    config = MixtralConfig.from_dict(manifest["config"])
    max_seq_len = int(manifest["max_seq_len"])
    return EngineUnderTest(
        name=f"{manifest['backend']} engine {engine_dir}",
        precision=precision_of(manifest),
        dtype=manifest["dtype"],
        max_seq_len=max_seq_len,
        runner=BackendRunner(
            lambda batch: load_backend(engine_dir, max_batch=batch, extra_outputs=extras),
            feed_metadata(config, max_seq_len, cache_dtype(manifest["dtype"])),
        ),
        load_backend=lambda max_batch: load_backend(engine_dir, max_batch=max_batch),
    )
