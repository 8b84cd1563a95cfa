"""`OrtBackend`: an ONNX Runtime engine directory behind the `Backend` interface.

Memory discipline (host-written slices measured faster than ORT ping-pong caches; benchmarks/bench_kv_designs.py):
- Per layer, K and V buffers [max_batch, kv_heads, max_seq, head_dim] are numpy arrays allocated once at
  load. They are bound (IOBinding) as the read-only `past_key.{i}` / `past_value.{i}` inputs through
  OrtValues that wrap the arrays' memory; for a batch B < max_batch the OrtValue wraps the contiguous
  prefix view `buffer[:B]` (rows are the leading axis), so nothing is copied. OrtValue does not keep its
  numpy array alive: the backend holds both.
- Decode steps (T = 1) have static output shapes: logits and new K/V go into per-batch-size buffers that
  are allocated on first use and bound once. Prefill outputs (T varies) are allocated by ORT.
- After each run the host writes each row's new K/V slice into the buffers at its positions
  (`KVCache.write` semantics): one slice assignment per row and layer, never a whole-cache copy.

With device "cuda" (onnxruntime-gpu) the same host buffers are bound and ORT moves them to the GPU per run:
correct, not fast; a device-resident cache is TensorRT's job in moetrt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moetrt import names as io_names
from moetrt.artifacts import MANIFEST, manifest_config, read_manifest
from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig
from moetrt.names import DATA_FILE, MODEL_FILE
from moetrt.runtime.backend import ClosingContext
from moetrt.runtime.ort_session import add_graph_outputs, create_session

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class OrtBackend(ClosingContext):
    """One loaded ORT engine with its static KV buffers.

    `extras` holds, after each `step`, the values named in `extra_outputs` at load (e.g.
    `layers.0.moe_input`, `layers.0.router_logits`, `layers.0.moe_output`), for layer-by-layer validation.
    """

    name = "ort"

    def __init__(
        self,
        session: Any,
        config: MixtralConfig,
        max_batch: int,
        max_seq_len: int,
        dtype: str,
        extra_outputs: Sequence[str] = (),
    ):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.config = config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.dtype = np.dtype(_NUMPY_DTYPES[dtype])
        self.extra_outputs = tuple(extra_outputs)
        self.extras: dict[str, np.ndarray] = {}
        shape = (max_batch, config.num_key_value_heads, max_seq_len, config.head_dim)
        layers = range(config.num_hidden_layers)
        self._k = [np.zeros(shape, dtype=self.dtype) for _ in layers]
        self._v = [np.zeros(shape, dtype=self.dtype) for _ in layers]
        self._kv_names = [(io_names.new_key(i), io_names.new_value(i)) for i in layers]
        self._outputs = [io_names.LOGITS, *(name for pair in self._kv_names for name in pair), *self.extra_outputs]
        self._binding = session.io_binding()
        self._bound_batch: int | None = None  # batch size whose cache views are bound
        self._output_mode: int | str | None = None  # batch of the bound decode buffers, "prefill", or unbound
        self._cache_views: dict[int, list[tuple[Any, Any]]] = {}  # batch -> OrtValues over k[:batch], v[:batch]
        self._decode_outputs: dict[int, dict[str, tuple[np.ndarray, Any]]] = {}

    @classmethod
    def load(
        cls,
        engine_dir: str | Path,
        max_batch: int | None = None,
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
    ) -> OrtBackend:
        """Open the engine in `engine_dir`. max_batch defaults to the manifest's (the export's); threads to the
        thread count the engine was built for; extra_outputs are graph values to return in `extras`."""
        engine_dir = Path(engine_dir)
        manifest = read_engine_manifest(engine_dir)
        for file in (MODEL_FILE, DATA_FILE):
            if not (engine_dir / file).is_file():
                raise MoetrtError(f"{engine_dir / file}: not found; the engine directory is incomplete, rebuild it")
        config = manifest_config(manifest)
        max_seq_len = int(manifest["max_seq_len"])
        batch = max_batch or int(manifest["max_batch"])
        if batch < 1:
            raise MoetrtError(f"max_batch: expected a positive integer, found {batch}")
        graph = None
        if extra_outputs:
            try:
                graph = add_graph_outputs(engine_dir / MODEL_FILE, extra_outputs)
            except MoetrtError:
                raise
            except Exception as err:  # protobuf's DecodeError on a damaged file
                raise MoetrtError(f"{engine_dir / MODEL_FILE}: not a readable ONNX model ({err})") from None
        threads = threads if threads is not None else manifest.get("threads")
        session = create_session(engine_dir, threads, manifest.get("device", "cpu"), model=graph)
        _check_graph(session, engine_dir, config, max_seq_len)
        return cls(session, config, batch, max_seq_len, manifest["dtype"], extra_outputs)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, slots: Sequence[int] | None = None) -> np.ndarray:
        """Run [B, T] tokens at their positions, store the new K/V, return float32 logits [B, T, vocab]."""
        if slots is not None and list(slots) != list(range(len(input_ids))):
            raise MoetrtError("OrtBackend.step: only the leading slots 0..B-1 can be stepped by this engine layout")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        starts = self._check_step(ids, pos)
        b, t = ids.shape
        self._bind(b, decode=t == 1)
        binding = self._binding
        binding.bind_cpu_input(io_names.INPUT_IDS, ids)
        binding.bind_cpu_input(io_names.POSITION_IDS, pos)
        self.session.run_with_iobinding(binding)
        static = self._decode_outputs.get(b, {}) if t == 1 else {}
        values = {
            name: static[name][0] if name in static else value.numpy()
            for name, value in zip(self._outputs, binding.get_outputs(), strict=True)
        }
        for layer, (k_name, v_name) in enumerate(self._kv_names):
            new_k, new_v = values[k_name], values[v_name]
            for row, start in enumerate(starts):
                self._k[layer][row, :, start : start + t] = new_k[row]
                self._v[layer][row, :, start : start + t] = new_v[row]
        self.extras = {name: values[name] for name in self.extra_outputs}
        return values[io_names.LOGITS].astype(np.float32)  # a copy: decode's buffer is reused next step

    def kv_cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of layer `layer`'s K and V buffers [max_batch, kv_heads, max_seq, head_dim]."""
        return self._k[layer].copy(), self._v[layer].copy()

    def set_kv_cache(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """See `Backend.set_kv_cache`."""
        self._k[layer][: len(k)] = k
        self._v[layer][: len(v)] = v

    def close(self) -> None:
        """Drop the session, the binding and the buffers (the bindings first: they point into the buffers)."""
        self._binding = None
        self.session = None
        self._cache_views.clear()
        self._decode_outputs.clear()
        self._k, self._v = [], []

    # --- internals -------------------------------------------------------------------------------
    def _check_step(self, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Validate one step's inputs; returns each row's first position."""
        if self.session is None:
            raise MoetrtError("OrtBackend: step() after close()")
        if ids.ndim != 2 or ids.shape != pos.shape or ids.shape[1] == 0:
            raise MoetrtError(
                f"input_ids {ids.shape} and position_ids {pos.shape}: expected the same non-empty [batch, seq] shape"
            )
        b, t = ids.shape
        if b > self.max_batch:
            raise MoetrtError(f"input_ids: batch {b} exceeds the backend's max_batch {self.max_batch}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise MoetrtError(f"input_ids: token ids must lie in [0, {self.config.vocab_size})")
        starts = pos[:, 0]
        if (pos != starts[:, None] + np.arange(t)).any():
            raise MoetrtError("position_ids: each row must hold consecutive positions")
        if starts.min() < 0 or starts.max() + t > self.max_seq_len:
            raise MoetrtError(f"position_ids: positions must lie in [0, {self.max_seq_len}) (the engine's max_seq_len)")
        return starts

    def _bind(self, batch: int, decode: bool) -> None:
        """(Re)bind the cache views for `batch` and the outputs for decode (preallocated) or prefill (ORT's)."""
        binding = self._binding
        if self._bound_batch != batch:
            if batch not in self._cache_views:
                wrap = self._ort.OrtValue.ortvalue_from_numpy
                pairs = zip(self._k, self._v, strict=True)
                self._cache_views[batch] = [(wrap(k[:batch]), wrap(v[:batch])) for k, v in pairs]
            for layer, (k_view, v_view) in enumerate(self._cache_views[batch]):
                binding.bind_ortvalue_input(io_names.past_key(layer), k_view)
                binding.bind_ortvalue_input(io_names.past_value(layer), v_view)
            self._bound_batch = batch
        mode = batch if decode else "prefill"
        if self._output_mode != mode:
            binding.clear_binding_outputs()
            if decode and batch not in self._decode_outputs:
                self._decode_outputs[batch] = self._allocate_decode_outputs(batch)
            static = self._decode_outputs[batch] if decode else {}
            for name in self._outputs:
                if name in static:
                    binding.bind_ortvalue_output(name, static[name][1])
                else:
                    binding.bind_output(name, "cpu")
            self._output_mode = mode

    def _allocate_decode_outputs(self, batch: int) -> dict[str, tuple[np.ndarray, Any]]:
        """Decode's static outputs (logits, new K/V) as arrays with the OrtValues that wrap them."""
        cfg = self.config
        shapes = {io_names.LOGITS: (batch, 1, cfg.vocab_size)}
        for pair in self._kv_names:
            shapes.update(dict.fromkeys(pair, (batch, cfg.num_key_value_heads, 1, cfg.head_dim)))
        arrays = {name: np.empty(shape, dtype=self.dtype) for name, shape in shapes.items()}
        return {name: (a, self._ort.OrtValue.ortvalue_from_numpy(a)) for name, a in arrays.items()}


def read_engine_manifest(engine_dir: Path) -> dict[str, Any]:
    """The engine's manifest, refused with one line unless it is an ORT engine of this moetrt version."""
    if not engine_dir.is_dir():
        raise MoetrtError(f"{engine_dir}: not found; expected an ONNX Runtime engine directory (`moetrt build`)")
    manifest = read_manifest(engine_dir, "engine")
    if manifest.get("backend") != "ort":
        raise MoetrtError(f"{engine_dir / MANIFEST}: an engine for backend {manifest.get('backend')!r}, expected 'ort'")
    if manifest["dtype"] not in _NUMPY_DTYPES:
        raise MoetrtError(
            f"{engine_dir / MANIFEST}: dtype {manifest['dtype']!r}; ONNX Runtime engines run float32 or float16"
        )
    return manifest


def _check_graph(session: Any, engine_dir: Path, config: MixtralConfig, max_seq_len: int) -> None:
    """Refuse an engine whose graph does not match its manifest's model (e.g. files copied between engines)."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    expected = [io_names.INPUT_IDS, io_names.POSITION_IDS]
    expected += [name(i) for i in range(config.num_hidden_layers) for name in (io_names.past_key, io_names.past_value)]
    kv = [config.num_key_value_heads, max_seq_len, config.head_dim]
    if sorted(inputs) != sorted(expected) or inputs[io_names.past_key(0)][1:] != kv:
        raise MoetrtError(
            f"{engine_dir / MODEL_FILE}: graph inputs do not match the manifest's model "
            f"({config.num_hidden_layers} layers, caches [batch, {', '.join(map(str, kv))}]): rebuild the engine"
        )
