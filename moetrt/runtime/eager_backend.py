"""The eager reference as a runtime backend: what every engine is compared against, and the "eager" row of
the benchmarks.

It drives `moetrt.model.mixtral.Mixtral` exactly as an engine runs its graph: one functional forward per
step over static K/V buffers allocated once (`KVCache`), with the step's new K/V written in place at the
rows' positions. Inputs and outputs are numpy arrays, as for every backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moetrt.model.checkpoint import load_model
from moetrt.model.mixtral import KVCache, Mixtral


class EagerBackend:
    """A `Backend` over the eager model, with static K/V buffers [max_batch, kv_heads, max_seq_len, head_dim]
    per layer on the model's device and in its dtype."""

    name = "eager"

    def __init__(self, model: Mixtral, max_batch: int, max_seq_len: int):
        self.model = model.eval()
        self.config = model.config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.cache = KVCache(self.config, max_batch, max_seq_len, weight.dtype, str(weight.device))

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        max_batch: int,
        max_seq_len: int,
        dtype: str | None = None,
        device: str = "cpu",
    ) -> EagerBackend:
        """Load a Hugging Face checkpoint (dtype defaults to the config's) and allocate the buffers."""
        return cls(load_model(checkpoint_dir, dtype=dtype, device=device), max_batch, max_seq_len)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """See `Backend.step`: int64 [B, T] ids and positions -> float32 logits [B, T, vocab]."""
        ids = torch.from_numpy(input_ids).to(self.device)
        pos = torch.from_numpy(position_ids).to(self.device)
        b = ids.shape[0]
        logits, new_k, new_v = self.model(ids, pos, [k[:b] for k in self.cache.k], [v[:b] for v in self.cache.v])
        self.cache.write(pos, new_k, new_v)
        return logits.float().cpu().numpy()

    def kv_cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's buffers; bfloat16 (which numpy lacks) comes back as float32."""
        k, v = self.cache.k[layer], self.cache.v[layer]
        if k.dtype == torch.bfloat16:
            k, v = k.float(), v.float()
        return k.cpu().numpy().copy(), v.cpu().numpy().copy()

    def close(self) -> None:
        """Drop the references to the model and the buffers; the backend cannot step afterwards."""
        del self.model, self.cache
