"""The TensorRT engine as a `Backend` (moetrt/runtime/backend.py): static device KV buffers, name-based I/O
binding, and the decode step captured once in a CUDA graph.

Buffers. K/V caches [max_batch, kv_heads, max_seq_len, head_dim] per layer are torch CUDA tensors allocated
once; the engine reads them as `past_key.{i}` / `past_value.{i}` (rows [:B] of the buffer, a contiguous
prefix) and returns the step's `new_key.{i}` / `new_value.{i}`, which are scattered into the buffers at
`position_ids` on the device (KVCache.write semantics), so no step copies a cache.

Two execution contexts, one per optimization profile (moetrt.engines.trt.profiles): prefill (any T) binds
per-step outputs; decode (T = 1) always runs the fixed batch max_batch from static input/output buffers, so
its `execute_async_v3` plus the K/V scatter are captured once in a CUDA graph and replayed. Rows a decode
step does not use get token 0 at position max_seq_len - 1: that cache slot is only ever written by a
row's own step at that position (attention reads positions before the query's), so padding never disturbs
a live row. Imports of tensorrt happen at load; MoetrtError if TensorRT or a CUDA GPU is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrt import names as io
from moetrt.artifacts import MANIFEST, read_manifest
from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig
from moetrt.model.mixtral import TORCH_DTYPES
from moetrt.registry import TENSORRT_MISSING
from moetrt.runtime.backend import ClosingContext

PREFILL, DECODE = 0, 1  # optimization profile indices, in the order moetrt.engines.trt builds them


class TrtBackend(ClosingContext):
    """A `Backend` over a deserialized TensorRT engine with static CUDA K/V buffers."""

    name = "trt"

    def __init__(self, engine_dir: str | Path, max_batch: int | None = None, extra_outputs: Sequence[str] = ()):
        trt = _import_tensorrt()
        if not torch.cuda.is_available():
            raise MoetrtError(f"{engine_dir}: TensorRT engines run on a CUDA GPU, and torch sees none")
        engine_dir = Path(engine_dir)
        manifest = _read_manifest(engine_dir)
        self.config = MixtralConfig.from_dict(manifest["config"])
        self.max_batch = int(manifest["max_batch"])
        if max_batch is not None:
            if not 1 <= max_batch <= self.max_batch:
                raise MoetrtError(f"max_batch: {max_batch} is outside [1, {self.max_batch}] (the engine's profile)")
            self.max_batch = max_batch
        if extra_outputs:
            raise MoetrtError(f"{engine_dir}: this TensorRT engine returns no per-layer values; rebuild it")
        self.max_seq_len = int(manifest["max_seq_len"])
        self.dtype = TORCH_DTYPES[manifest["dtype"]]
        self._trt = trt

        from moetrt.plugins.trt_moe import register_plugin

        register_plugin()  # before deserializing: JIT engines look the TopKMoE plugin up by name
        engine_file = engine_dir / manifest.get("engine", "model.engine")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise MoetrtError(f"{engine_file}: TensorRT could not deserialize the engine (built by another version?)")
        self.stream = torch.cuda.Stream()
        cfg = self.config
        shape = (self.max_batch, cfg.num_key_value_heads, self.max_seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device="cuda") for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device="cuda") for _ in range(cfg.num_hidden_layers)]
        self._prefill = self._context(PREFILL)
        self._decode = self._context(DECODE)
        self._graph = self._capture_decode()

    @classmethod
    def load(
        cls,
        engine_dir: str | Path,
        max_batch: int | None = None,
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
    ) -> TrtBackend:
        """`Backend.load`: threads do not apply to a GPU engine; max_batch may lower the manifest's."""
        return cls(engine_dir, max_batch=max_batch, extra_outputs=extra_outputs)

    def _context(self, profile: int):
        context = self.engine.create_execution_context()
        context.set_optimization_profile_async(profile, self.stream.cuda_stream)
        return context

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                  trt.int64: torch.int64, trt.int32: torch.int32}  # fmt: skip
        return dtypes[self.engine.get_tensor_dtype(name)]

    def _bind(self, context, ids: torch.Tensor, pos: torch.Tensor, outputs: dict[str, torch.Tensor] | None = None
              ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Set shapes and addresses for [B, T] ids/positions and the caches' first B rows; allocate the outputs
        unless given. Returns the outputs by name."""
        b = ids.shape[0]
        inputs = {io.INPUT_IDS: ids, io.POSITION_IDS: pos}
        for i in range(self.config.num_hidden_layers):
            inputs[io.past_key(i)], inputs[io.past_value(i)] = self.k[i][:b], self.v[i][:b]
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise MoetrtError(f"engine input {name}: shape {tuple(tensor.shape)} rejected (not in its profile?)")
            context.set_tensor_address(name, tensor.data_ptr())
        if outputs is None:
            names = [io.LOGITS] + [n for i in range(self.config.num_hidden_layers)
                                   for n in (io.new_key(i), io.new_value(i))]  # fmt: skip
            outputs = {n: torch.empty(tuple(context.get_tensor_shape(n)), dtype=self._torch_dtype(n), device="cuda")
                       for n in names}  # fmt: skip
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        return outputs

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise MoetrtError("TensorRT failed to enqueue the engine (see the log above)")

    def _store(self, pos: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        """Scatter each layer's new K/V [B, kv, T, D] into the static buffers at the rows' positions."""
        b, t = pos.shape
        for i in range(self.config.num_hidden_layers):
            new_k, new_v = outputs[io.new_key(i)], outputs[io.new_value(i)]
            index = pos[:, None, :, None].expand(b, new_k.shape[1], t, new_k.shape[3])
            self.k[i][:b].scatter_(2, index, new_k)
            self.v[i][:b].scatter_(2, index, new_v)

    def _capture_decode(self) -> torch.cuda.CUDAGraph:
        """Static decode buffers, one warm-up run (TensorRT defers work to the first enqueue), then capture."""
        with torch.cuda.stream(self.stream):
            self._ids = torch.zeros((self.max_batch, 1), dtype=torch.int64, device="cuda")
            self._pos = torch.full((self.max_batch, 1), self.max_seq_len - 1, dtype=torch.int64, device="cuda")
            self._out = self._bind(self._decode, self._ids, self._pos)
            self._execute(self._decode)
            self._store(self._pos, self._out)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute(self._decode)
                self._store(self._pos, self._out)
        return graph

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """See `Backend.step`: int64 [B, T] ids and positions -> float32 logits [B, T, vocab]."""
        b, t = input_ids.shape
        if not 1 <= b <= self.max_batch or position_ids.shape != (b, t):
            raise MoetrtError(f"step: ids {input_ids.shape} / positions {position_ids.shape}; batch must be in "
                              f"[1, {self.max_batch}] and both [B, T]")  # fmt: skip
        if int(position_ids.max()) + 1 > self.max_seq_len:
            raise MoetrtError(f"step: position {int(position_ids.max())} >= max_seq_len {self.max_seq_len}")
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        pos = torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64))
        with torch.cuda.stream(self.stream):
            if t == 1:
                self._ids.zero_()
                self._pos.fill_(self.max_seq_len - 1)
                self._ids[:b].copy_(ids)
                self._pos[:b].copy_(pos)
                self._graph.replay()
                logits = self._out[io.LOGITS][:b]
            else:
                ids, pos = ids.cuda(), pos.cuda()
                outputs = self._bind(self._prefill, ids, pos)
                self._execute(self._prefill)
                self._store(pos, outputs)
                logits = outputs[io.LOGITS]
            return logits.float().cpu().numpy()

    def kv_cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's buffers; bfloat16 comes back as float32 (numpy has no bfloat16)."""
        with torch.cuda.stream(self.stream):
            k, v = self.k[layer], self.v[layer]
            if k.dtype == torch.bfloat16:
                k, v = k.float(), v.float()
            return k.cpu().numpy(), v.cpu().numpy()

    def set_kv_cache(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """See `Backend.set_kv_cache` (host arrays copied into the device buffers on the engine's stream)."""
        with torch.cuda.stream(self.stream):
            for buffer, value in ((self.k[layer], k), (self.v[layer], v)):
                buffer[: len(value)].copy_(torch.from_numpy(np.ascontiguousarray(value)).to(buffer.dtype))
            self.stream.synchronize()

    def close(self) -> None:
        """Release the CUDA graph, contexts, engine and buffers; the backend cannot step afterwards."""
        self.stream.synchronize()
        del self._graph, self._decode, self._prefill, self.engine, self._runtime, self.k, self.v, self._out


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MoetrtError(TENSORRT_MISSING) from None
    return trt


def _read_manifest(engine_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(engine_dir, "engine")
    if manifest.get("backend") != "trt":
        raise MoetrtError(f"{engine_dir / MANIFEST}: a {manifest.get('backend')!r} engine, expected a TensorRT engine")
    return manifest
