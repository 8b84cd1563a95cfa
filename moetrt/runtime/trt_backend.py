"""The TensorRT engine as a `Backend` (moetrt/runtime/backend.py): static device KV buffers, name-based I/O
binding, and, for AOT engines, the decode step captured once in a CUDA graph.

Buffers. K/V caches [max_batch, kv_heads, max_seq_len, head_dim] per layer are torch CUDA tensors allocated
once; row s is cache slot s. The engine reads a contiguous block of rows as `past_key.{i}` /
`past_value.{i}` and returns the step's `new_key.{i}` / `new_value.{i}`, which are scattered into the
buffers at `position_ids` on the device (KVCache.write semantics), so no step copies a cache.

Two execution contexts, one per optimization profile (moetrt.engines.trt.profiles):
- prefill (any T) binds per-step outputs over the rows of the step's slots: one run over rows 0..B-1 when
  the slots are those, else one run per slot over its own row (each a contiguous [1, ...] view).
- decode (T = 1) always runs the fixed batch max_batch from static input/output buffers: batch row b goes
  to row slots[b]; the other rows get token 0 at position 0 and their K/V scatter writes back what their
  slot already held there, so slots not named are untouched. For AOT engines `execute_async_v3` plus the
  scatter are captured in a CUDA graph per live-length bucket (below) and replayed. The capture uses
  capture_error_mode="thread_local", as TensorRT's trtexec captures (cudaStreamCaptureModeThreadLocal in
  samples/common/sampleDevice.h), so CUDA calls from other threads do not invalidate it (torch.cuda.graph
  defaults to "global"). JIT engines are not captured:
  their plugin runs Python and torch allocations on every enqueue.
Live length. The engine's attention reads the first L slots of each cache, L being the length of the input
`kv_live` (moetrt/engines/trt_attention.py): a prefill sets L to its rows' longest cached length (at least
1); decode rounds it up to a power of two (at least DECODE_MIN_LIVE, at most max_seq_len), so the decode
step's shapes take few values: each bucket gets its own first run (outside capture) and its own CUDA
graph, made when a step first needs it. A step thus reads at most twice the live cache, not the capacity.
All work runs on the backend's own stream, never on the default stream (`execute_async_v3`'s documentation:
on the default stream TensorRT adds cudaDeviceSynchronize calls to stay correct).

Per-layer values: the engine's manifest lists the values it returns (`layer_outputs`: moe_input(i),
moe_output(i) of `moetrt.names`); those named in `extra_outputs` at load come back in `extras` after each
step as [tokens, hidden] arrays, tokens flattened over the step's batch rows (bfloat16 as float32).

MoetrtError (one line) if TensorRT or a CUDA GPU is missing, or for anything `check_engine` refuses.
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
from moetrt.names import ENGINE_FILE
from moetrt.registry import TENSORRT_MISSING
from moetrt.runtime.backend import ClosingContext

PREFILL, DECODE = 0, 1  # optimization profile indices, in the order moetrt.engines.trt builds them
DECODE_MIN_LIVE = 64  # smallest decode live-length bucket


class TrtBackend(ClosingContext):
    """A `Backend` over a deserialized TensorRT engine with static CUDA K/V buffers."""

    name = "trt"

    def __init__(self, engine_dir: str | Path, max_batch: int | None = None, extra_outputs: Sequence[str] = ()):
        trt = _import_tensorrt()
        engine_dir = Path(engine_dir)
        manifest, self.max_batch, self.extra_outputs = check_engine(engine_dir, max_batch, extra_outputs)
        self.config = MixtralConfig.from_dict(manifest["config"])
        self.extras: dict[str, np.ndarray] = {}
        self.max_seq_len = int(manifest["max_seq_len"])
        self.dtype = TORCH_DTYPES[manifest["dtype"]]
        engine_file = engine_dir / manifest["engine"]
        if not torch.cuda.is_available():
            raise MoetrtError(f"{engine_dir}: TensorRT engines run on a CUDA GPU, and torch sees none")
        self._trt = trt

        from moetrt.plugins.trt_moe import register_plugin

        register_plugin(manifest["plugins"])  # before deserializing: the engine names its plugins' creators
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise MoetrtError(f"{engine_file}: TensorRT could not deserialize the engine (built by another version?)")
        self._outputs = [
            name
            for name in (self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT
        ]
        missing = [name for name in (io.LOGITS, *manifest.get("layer_outputs", [])) if name not in self._outputs]
        if missing:
            raise MoetrtError(f"{engine_file}: no engine output {missing[0]!r}, which the manifest lists; rebuild it")
        self.stream = torch.cuda.Stream()
        cfg = self.config
        shape = (self.max_batch, cfg.num_key_value_heads, self.max_seq_len, cfg.head_dim)
        with torch.cuda.stream(self.stream):  # allocated and zeroed on the stream that uses them
            self.k = [torch.zeros(shape, dtype=self.dtype, device="cuda") for _ in range(cfg.num_hidden_layers)]
            self.v = [torch.zeros(shape, dtype=self.dtype, device="cuda") for _ in range(cfg.num_hidden_layers)]
            self._live = torch.zeros(self.max_seq_len, dtype=torch.int32, device="cuda")  # kv_live's storage
        self._prefill = self._context(PREFILL)
        self._decode = self._context(DECODE)
        self._capture = manifest["plugins"] == "aot"
        self._graphs: dict[int, torch.cuda.CUDAGraph | None] = {}  # decode live bucket -> its captured step
        self._prepare_decode()

    @classmethod
    def load(
        cls,
        engine_dir: str | Path,
        max_batch: int | None = None,
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
    ) -> TrtBackend:
        """`Backend.load`: threads do not apply to a GPU engine; max_batch may lower the manifest's;
        extra_outputs must be among the manifest's `layer_outputs`."""
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

    def _bind(self, context, ids: torch.Tensor, pos: torch.Tensor, rows: slice, live: int) -> dict[str, torch.Tensor]:
        """Set shapes and addresses for [B, T] ids/positions, the caches' rows `rows` (B of them, contiguous) and
        `live` cache slots read; allocate every engine output. Returns the outputs by name."""
        inputs = {io.INPUT_IDS: ids, io.POSITION_IDS: pos, io.KV_LIVE: self._live[:live]}
        for i in range(self.config.num_hidden_layers):
            inputs[io.past_key(i)], inputs[io.past_value(i)] = self.k[i][rows], self.v[i][rows]
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise MoetrtError(f"engine input {name}: shape {tuple(tensor.shape)} rejected (not in its profile?)")
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {n: torch.empty(tuple(context.get_tensor_shape(n)), dtype=self._torch_dtype(n), device="cuda")
                   for n in self._outputs}  # fmt: skip
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        return outputs

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise MoetrtError("TensorRT failed to enqueue the engine (see the log above)")

    def _store(self, pos: torch.Tensor, outputs: dict[str, torch.Tensor], rows: slice,
               keep: torch.Tensor | None = None) -> None:  # fmt: skip
        """Scatter each layer's new K/V [B, kv, T, D] into the buffers' rows `rows` at the rows' positions;
        where `keep` [B] is False, write back what the buffer holds there instead (an unused decode row)."""
        b, t = pos.shape
        for i in range(self.config.num_hidden_layers):
            for cache, new in ((self.k[i][rows], outputs[io.new_key(i)]), (self.v[i][rows], outputs[io.new_value(i)])):
                index = pos[:, None, :, None].expand(b, new.shape[1], t, new.shape[3])
                if keep is not None:
                    new = torch.where(keep[:, None, None, None], new, cache.gather(2, index))
                cache.scatter_(2, index, new)

    def _decode_step(self) -> None:
        self._execute(self._decode)
        self._store(self._pos, self._out, slice(0, self.max_batch), self._keep)

    def _prepare_decode(self) -> None:
        """Static decode buffers (the outputs' shapes do not depend on the live length) and the smallest
        bucket's first run and graph."""
        with torch.cuda.stream(self.stream):
            self._ids = torch.zeros((self.max_batch, 1), dtype=torch.int64, device="cuda")
            self._pos = torch.zeros((self.max_batch, 1), dtype=torch.int64, device="cuda")
            self._keep = torch.zeros(self.max_batch, dtype=torch.bool, device="cuda")
            bucket = self._bucket(1)
            self._out = self._bind(self._decode, self._ids, self._pos, slice(0, self.max_batch), bucket)
            self._decode_graph(bucket)

    def _bucket(self, live: int) -> int:
        """The decode live length for `live` cached slots: the next power of two, within the engine's range."""
        return min(self.max_seq_len, max(DECODE_MIN_LIVE, 1 << max(live - 1, 0).bit_length()))

    def _decode_graph(self, bucket: int) -> torch.cuda.CUDAGraph | None:
        """Set the decode context's `kv_live` to `bucket` slots; on the bucket's first use run the step once
        (TensorRT defers work to the first enqueue at a shape) and, for AOT engines, capture it. The captured
        step (None: run it directly), which only runs at this shape."""
        if not self._decode.set_input_shape(io.KV_LIVE, (bucket,)):
            raise MoetrtError(f"engine input {io.KV_LIVE}: {bucket} slots rejected (not in its decode profile?)")
        if bucket not in self._graphs:
            self._keep.zero_()  # every row writes back what its slot holds: the warm-up changes no cache
            self._decode_step()
            self.stream.synchronize()
            graph = None
            if self._capture:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    self._decode_step()
            self._graphs[bucket] = graph
        return self._graphs[bucket]

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, slots: Sequence[int] | None = None) -> np.ndarray:
        """See `Backend.step`: int64 [B, T] ids and positions, row b in cache slot slots[b] -> float32 logits
        [B, T, vocab]; `extras` then holds the requested per-layer values."""
        b, t = input_ids.shape
        slots = list(range(b)) if slots is None else [int(s) for s in slots]
        if not 1 <= b <= self.max_batch or t < 1 or position_ids.shape != (b, t):
            raise MoetrtError(f"step: ids {input_ids.shape} / positions {position_ids.shape}; batch must be in "
                              f"[1, {self.max_batch}] and both [B, T]")  # fmt: skip
        if len(slots) != b or len(set(slots)) != b or not all(0 <= s < self.max_batch for s in slots):
            raise MoetrtError(f"step: slots {slots}; expected {b} distinct slots in [0, {self.max_batch})")
        if int(position_ids.min()) < 0 or int(position_ids.max()) + 1 > self.max_seq_len:
            raise MoetrtError(f"step: positions must be in [0, {self.max_seq_len}) (max_seq_len)")
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        pos = torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64))
        with torch.cuda.stream(self.stream):
            if t == 1:
                rows = torch.tensor(slots, device="cuda")
                graph = self._decode_graph(self._bucket(int(position_ids.max())))
                self._ids.zero_()
                self._pos.zero_()
                self._keep.zero_()
                self._ids[rows] = ids.cuda()
                self._pos[rows] = pos.cuda()
                self._keep[rows] = True
                if graph is not None:
                    graph.replay()
                else:
                    self._decode_step()
                values = {name: self._out[name][rows] for name in (io.LOGITS, *self.extra_outputs)}  # T = 1
            elif slots == list(range(b)):
                values = self._prefill_rows(ids.cuda(), pos.cuda(), slice(0, b))
            else:
                parts = [self._prefill_rows(ids[r : r + 1].cuda(), pos[r : r + 1].cuda(), slice(s, s + 1))
                         for r, s in enumerate(slots)]  # fmt: skip
                values = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
            self.extras = {name: _to_numpy(values[name]) for name in self.extra_outputs}
            return values[io.LOGITS].float().cpu().numpy()

    def _prefill_rows(self, ids: torch.Tensor, pos: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        outputs = self._bind(self._prefill, ids, pos, rows, max(1, int(pos[:, 0].max())))
        self._execute(self._prefill)
        self._store(pos, outputs, rows)
        return {name: outputs[name] for name in (io.LOGITS, *self.extra_outputs)}

    def kv_cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's buffers; bfloat16 comes back as float32 (numpy has no bfloat16)."""
        with torch.cuda.stream(self.stream):
            return _to_numpy(self.k[layer]), _to_numpy(self.v[layer])

    def set_kv_cache(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """See `Backend.set_kv_cache` (host arrays copied into the device buffers on the engine's stream)."""
        with torch.cuda.stream(self.stream):
            for buffer, value in ((self.k[layer], k), (self.v[layer], v)):
                buffer[: len(value)].copy_(torch.from_numpy(np.ascontiguousarray(value)).to(buffer.dtype))
            self.stream.synchronize()

    def close(self) -> None:
        """Release the CUDA graph, contexts, engine and buffers; the backend cannot step afterwards."""
        self.stream.synchronize()
        del self._graphs, self._decode, self._prefill, self.engine, self._runtime, self.k, self.v, self._out


def check_engine(
    engine_dir: Path, max_batch: int | None, extra_outputs: Sequence[str]
) -> tuple[dict[str, Any], int, tuple[str, ...]]:
    """What opening a TensorRT engine directory checks before TensorRT sees it: its manifest (a TensorRT engine
    of this moetrt, a known plugin mode, the engine file present), max_batch within the engine's profile
    (default: the manifest's), and each of `extra_outputs` among the per-layer values the engine returns
    (the manifest's `layer_outputs`). Returns (manifest, max_batch, extra_outputs); MoetrtError (one line)."""
    manifest = read_manifest(engine_dir, "engine")
    where = engine_dir / MANIFEST
    if manifest.get("backend") != "trt":
        raise MoetrtError(f"{where}: a {manifest.get('backend')!r} engine, expected a TensorRT engine")
    if manifest.get("plugins") not in ("aot", "jit"):
        raise MoetrtError(f"{where}: field 'plugins' is {manifest.get('plugins')!r}, expected 'aot' or 'jit'")
    if manifest.get("attention") != io.KV_LIVE:
        raise MoetrtError(f"{where}: an engine whose attention reads the whole cache (built by an older moetrt, "
                          f"before the {io.KV_LIVE!r} input): rebuild it")  # fmt: skip
    engine_file = engine_dir / manifest.setdefault("engine", ENGINE_FILE)
    if not engine_file.is_file():
        raise MoetrtError(f"{engine_file}: not found; the engine directory is incomplete, rebuild it")
    limit = int(manifest["max_batch"])
    if max_batch is not None and not 1 <= max_batch <= limit:
        raise MoetrtError(f"max_batch: {max_batch} is outside [1, {limit}] (the engine's profile)")
    available = manifest.get("layer_outputs", [])
    for name in extra_outputs:
        if name not in available:
            offer = f"it returns {', '.join(available[:2])}, ..." if available else "it was built without them"
            raise MoetrtError(f"{engine_dir}: extra_outputs: {name!r} is not a per-layer output of this TensorRT "
                              f"engine ({offer}; router logits stay inside its route kernel)")  # fmt: skip
    return manifest, max_batch or limit, tuple(extra_outputs)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).cpu().numpy()


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MoetrtError(TENSORRT_MISSING) from None
    return trt
