"""The eager reference as a runtime backend: what every engine is compared against, and the "eager" row of
the benchmarks.

It drives `moetrt.model.mixtral.Mixtral` exactly as an engine runs its graph: one functional forward per
step over static K/V buffers allocated once (`KVCache`), with the step's new K/V written in place at the
rows' positions. Inputs and outputs are numpy arrays, as for every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from moetrt.errors import MoetrtError
from moetrt.memory import kv_cache_bytes, require_memory
from moetrt.model.checkpoint import load_model
from moetrt.model.config import DTYPE_BYTES, MixtralConfig
from moetrt.model.mixtral import KVCache, Mixtral, route
from moetrt.names import expert_ids, expert_weights, moe_input, moe_output, router_logits
from moetrt.runtime.backend import ClosingContext, check_slots
from moetrt.schema import MAX_BATCH, MAX_THREADS


class EagerBackend(ClosingContext):
    """A `Backend` over the eager model, with static K/V buffers [max_batch, kv_heads, max_seq_len, head_dim]
    per layer on the model's device and in its dtype.

    `extras` holds, after each step, the per-layer values named in `extra_outputs` (`moetrt.names`:
    moe_input / moe_output [T, H], router_logits [T, E], expert_ids [T, k] int64 / expert_weights [T, k] fp32
    from the model's own `route`; tokens flattened over the step's batch rows), captured with forward hooks on
    the MoE blocks, as an engine returns them as graph outputs.
    """

    name = "eager"

    def __init__(self, model: Mixtral, max_batch: int, max_seq_len: int, extra_outputs: Sequence[str] = ()):
        self.model = model.eval()
        self.config = model.config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.cache = KVCache(self.config, max_batch, max_seq_len, weight.dtype, str(weight.device))
        self.extra_outputs = tuple(extra_outputs)
        self.extras: dict[str, np.ndarray] = {}
        values = (moe_input, moe_output, router_logits, expert_ids, expert_weights)
        known = {name(i) for i in range(self.config.num_hidden_layers) for name in values}
        unknown = [name for name in self.extra_outputs if name not in known]
        if unknown:
            raise MoetrtError(f"extra_outputs: {unknown[0]!r} is not a per-layer value of this model (moetrt.names)")
        self._hooks = [
            layer.block_sparse_moe.register_forward_hook(self._capture(i))
            for i, layer in enumerate(self.model.layers)
            if any(name.startswith(f"layers.{i}.") for name in self.extra_outputs)
        ]

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        max_batch: int = 1,
        max_seq_len: int | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
    ) -> EagerBackend:
        """Load a Hugging Face checkpoint (dtype defaults to the config's, max_seq_len to its
        max_position_embeddings) and allocate the buffers; threads sets torch's intra-op threads."""
        if threads is not None:
            if not 1 <= threads <= MAX_THREADS:
                raise MoetrtError(f"threads: expected an integer in [1, {MAX_THREADS}], found {threads}")
            torch.set_num_threads(threads)
        if not 1 <= max_batch <= MAX_BATCH:
            raise MoetrtError(f"max_batch: expected an integer in [1, {MAX_BATCH}], found {max_batch}")
        if max_seq_len is not None and max_seq_len < 1:
            raise MoetrtError(f"max_seq_len: expected a positive integer, found {max_seq_len}")
        config = MixtralConfig.from_pretrained(checkpoint_dir)
        size = DTYPE_BYTES.get(dtype or config.dtype, 4)
        seq = max_seq_len or config.max_position_embeddings
        kv = kv_cache_bytes(config.num_hidden_layers, max_batch, config.num_key_value_heads, seq, config.head_dim, size)
        if device == "cpu":
            weights = config.param_counts()["total_params"] * size
            require_memory(weights + kv, f"{checkpoint_dir}: weights and a KV cache of {max_batch} rows x {seq} tokens")
        model = load_model(checkpoint_dir, dtype=dtype, device=device)
        return cls(model, max_batch, max_seq_len or model.config.max_position_embeddings, extra_outputs)

    @classmethod
    def load(
        cls,
        path: str | Path,
        max_batch: int | None = None,
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
    ) -> EagerBackend:
        """`Backend.load` for a checkpoint directory (max_seq_len: the config's max_position_embeddings)."""
        return cls.from_checkpoint(path, max_batch=max_batch or 1, threads=threads, extra_outputs=extra_outputs)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, slots: Sequence[int] | None = None) -> np.ndarray:
        """See `Backend.step`: int64 [B, T] ids and positions -> float32 logits [B, T, vocab]."""
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        pos = torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)).to(self.device)
        b = ids.shape[0]
        if slots is None or list(slots) == list(range(b)):
            rows: slice | torch.Tensor = slice(0, b)
            k_in, v_in = [k[:b] for k in self.cache.k], [v[:b] for v in self.cache.v]
        else:
            rows = torch.as_tensor(check_slots(slots, b, self.max_batch), device=self.device)
            k_in, v_in = [k[rows] for k in self.cache.k], [v[rows] for v in self.cache.v]
        logits, new_k, new_v = self.model(ids, pos, k_in, v_in)
        self.cache.write(pos, new_k, new_v, rows)
        return logits.float().cpu().numpy()

    def kv_cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's buffers; bfloat16 (which numpy lacks) comes back as float32."""
        k, v = self.cache.k[layer], self.cache.v[layer]
        if k.dtype == torch.bfloat16:
            k, v = k.float(), v.float()
        return k.cpu().numpy().copy(), v.cpu().numpy().copy()

    def set_kv_cache(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """See `Backend.set_kv_cache`."""
        for buffer, value in ((self.cache.k[layer], k), (self.cache.v[layer], v)):
            buffer[: len(value)] = torch.from_numpy(np.ascontiguousarray(value)).to(buffer.dtype)

    def close(self) -> None:
        """Drop the hooks and the references to the model and the buffers; the backend cannot step afterwards."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.model = self.cache = None  # type: ignore[assignment]

    def _capture(self, layer: int) -> Callable[..., None]:
        wanted = set(self.extra_outputs)

        def hook(block: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            flat = args[0].reshape(-1, args[0].shape[-1])
            values = {moe_input(layer): flat, moe_output(layer): output.reshape(flat.shape)}
            if {router_logits(layer), expert_ids(layer), expert_weights(layer)} & wanted:
                logits = values[router_logits(layer)] = flat @ block.gate.weight.t()  # the contract's logits
            if {expert_ids(layer), expert_weights(layer)} & wanted:
                values[expert_ids(layer)], values[expert_weights(layer)] = route(logits, block.top_k)
            for name, tensor in values.items():
                if name in wanted:
                    self.extras[name] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).cpu().numpy()

        return hook
