"""`OrtBackend`: an ONNX Runtime engine directory behind the `Backend` interface.

The engine's attention is `com.microsoft::GroupQueryAttention` (moetrt/engines/ort_attention.py), which
reads only each row's live cache positions and writes the step's K/V into the cache in place. So:
- Per layer, K and V buffers [max_batch, kv_heads, max_seq, head_dim] are numpy arrays allocated once at
  load (np.zeros: pages are committed as positions are written). Each is bound (IOBinding) as BOTH the
  `past_key.{i}` input and the `present_key.{i}` output through ONE OrtValue wrapping its memory, so the
  kernel updates it in place and ORT allocates no second cache (an output bound to its input's OrtValue is
  exact and skips ORT's copy; benchmarks/bench_kv_designs.py). OrtValue does not keep its numpy array
  alive: the backend holds both.
- A step over cache slots `slots` binds the contiguous row range [min(slots), max(slots)] of the buffers
  (a view, no copy). The rows of that range the step does not name ("idle" rows) run along with pad tokens
  at positions 0..T-1; the K/V they write there are saved before the run and restored after it, so an
  idle slot's cache is left exactly as it was. A range is one session run: one pass over the weights,
  where a run per contiguous group of slots would read them once per group.
- A multi-token step after a past (chunked prefill) runs one row at a time: ORT's kernel takes T > 1
  tokens with a past only for batch 1. A prefill from position 0 runs all rows at once.
- Decode steps (T = 1) write logits into a per-range-size buffer allocated on first use; prefill logits
  and the per-layer `extras` are allocated by ORT.
- After the session is created, the memory it wrote in full (its prepacked weights) is moved into
  transparent huge pages (moetrt.runtime.huge_pages): a decode step streams all of it, and with 4 KiB
  pages the TLB misses cost the mid int4 engine ~15-20% of its decode speed on the VM measured.

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
from moetrt.memory import kv_cache_bytes, require_memory
from moetrt.model.config import MixtralConfig
from moetrt.names import DATA_FILE, MODEL_FILE
from moetrt.runtime.backend import ClosingContext, check_slots
from moetrt.runtime.huge_pages import HugePageReport, back_with_huge_pages
from moetrt.runtime.ort_session import add_graph_outputs, create_session
from moetrt.schema import MAX_BATCH

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
PAD_TOKEN_ID = 0  # fed to idle rows of a slot range; any in-vocabulary id works (their outputs are dropped)


class OrtBackend(ClosingContext):
    """One loaded ORT engine with its static KV buffers.

    `extras` holds, after each `step`, the values named in `extra_outputs` at load (e.g.
    `layers.0.moe_input`, `layers.0.router_logits`, `layers.0.moe_output`), for layer-by-layer validation,
    for the step's batch rows only. `huge_pages` says how much of the session's memory `load` moved into
    transparent huge pages (moetrt.runtime.huge_pages).
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
        self.huge_pages = HugePageReport()  # set by `load` (moetrt.runtime.huge_pages)
        shape = (max_batch, config.num_key_value_heads, max_seq_len, config.head_dim)
        layers = range(config.num_hidden_layers)
        self._k = [np.zeros(shape, dtype=self.dtype) for _ in layers]
        self._v = [np.zeros(shape, dtype=self.dtype) for _ in layers]
        self._binding = session.io_binding()
        self._bound: tuple[int, int, bool] | None = None  # (first row, rows, decode) of the current binding
        self._views: dict[tuple[int, int], list[tuple[Any, Any]]] = {}  # (first, rows) -> OrtValues over k, v rows
        self._decode_logits: dict[int, tuple[np.ndarray, Any]] = {}  # rows -> [rows, 1, vocab] buffer, OrtValue

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
        if not 1 <= batch <= MAX_BATCH:
            raise MoetrtError(f"max_batch: expected an integer in [1, {MAX_BATCH}], found {batch}")
        itemsize = np.dtype(_NUMPY_DTYPES[manifest["dtype"]]).itemsize
        kv = kv_cache_bytes(config.num_hidden_layers, batch, config.num_key_value_heads, max_seq_len,
                            config.head_dim, itemsize)  # fmt: skip
        require_memory(kv, f"{engine_dir}: KV cache of {batch} rows x {max_seq_len} tokens")
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
        _check_graph(session, engine_dir, config, max_seq_len, manifest["dtype"])
        backend = cls(session, config, batch, max_seq_len, manifest["dtype"], extra_outputs)
        backend.huge_pages = back_with_huge_pages()  # the session's weights (the KV buffers are not resident)
        return backend

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, slots: Sequence[int] | None = None) -> np.ndarray:
        """Run [B, T] tokens at their positions in cache slots `slots` (default 0..B-1), store their K/V in
        place, return float32 logits [B, T, vocab]; see `Backend.step`."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        self._check_step(ids, pos)
        b, t = ids.shape
        rows = list(range(b)) if slots is None else check_slots(slots, b, self.max_batch)
        if t > 1 and b > 1 and pos[:, 0].max() > 0:
            return self._step_rows(ids, pos, rows)
        first, count = min(rows), max(rows) - min(rows) + 1
        order = [row - first for row in rows]  # batch row -> row of the bound range
        idle = sorted(set(range(count)) - set(order))
        if order != list(range(b)):
            ids, pos = self._spread(ids, pos, order, count)
        saved = [(k[first + r, :, :t].copy(), v[first + r, :, :t].copy()) for k, v in zip(self._k, self._v, strict=True)
                 for r in idle]  # fmt: skip
        self._bind(first, count, decode=t == 1)
        binding = self._binding
        binding.bind_cpu_input(io_names.INPUT_IDS, ids)
        binding.bind_cpu_input(io_names.POSITION_IDS, pos)
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self._output_names(), binding.get_outputs(), strict=True))
        if idle:
            restore = iter(saved)
            for k, v in zip(self._k, self._v, strict=True):
                for r in idle:
                    k[first + r, :, :t], v[first + r, :, :t] = next(restore)
        logits = self._decode_logits[count][0] if t == 1 else outputs[io_names.LOGITS].numpy()
        self.extras = {name: _rows_of(outputs[name].numpy(), order, count, t) for name in self.extra_outputs}
        if order != list(range(count)):
            return logits[order].astype(np.float32, copy=False)  # fancy indexing copies
        # Decode's buffer is reused next step: copy it. A prefill's logits are ORT's own fresh array (a 3872-token
        # prompt's are 496 MB at vocabulary 32000): no second copy.
        return logits.astype(np.float32, copy=t == 1)

    def kv_cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of layer `layer`'s K and V buffers [max_batch, kv_heads, max_seq, head_dim]."""
        return self._k[layer].copy(), self._v[layer].copy()

    def set_kv_cache(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """See `Backend.set_kv_cache` (written into the bound buffers themselves)."""
        self._k[layer][: len(k)] = k
        self._v[layer][: len(v)] = v

    def close(self) -> None:
        """Drop the session, the binding and the buffers (the bindings first: they point into the buffers)."""
        self._binding = None
        self.session = None
        self._views.clear()
        self._decode_logits.clear()
        self._k, self._v = [], []

    # --- internals -------------------------------------------------------------------------------
    def _step_rows(self, ids: np.ndarray, pos: np.ndarray, rows: list[int]) -> np.ndarray:
        """A multi-token step over rows that already hold a past, one row at a time: ORT's
        GroupQueryAttention takes T > 1 tokens after a past only for batch 1 ("batch_size must be 1 when
        sequence_length > 1 and past context is given")."""
        logits, extras = [], []
        for b, slot in enumerate(rows):
            logits.append(self.step(ids[b : b + 1], pos[b : b + 1], [slot]))
            extras.append(self.extras)
        self.extras = {name: np.concatenate([e[name] for e in extras]) for name in self.extra_outputs}
        return np.concatenate(logits)

    def _check_step(self, ids: np.ndarray, pos: np.ndarray) -> None:
        """Validate one step's inputs."""
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

    @staticmethod
    def _spread(ids: np.ndarray, pos: np.ndarray, order: list[int], count: int) -> tuple[np.ndarray, np.ndarray]:
        """The step's rows placed at their rows of the bound range; idle rows get pad tokens at 0..T-1."""
        t = ids.shape[1]
        range_ids = np.full((count, t), PAD_TOKEN_ID, dtype=np.int64)
        range_pos = np.tile(np.arange(t, dtype=np.int64), (count, 1))
        range_ids[order], range_pos[order] = ids, pos
        return range_ids, range_pos

    def _output_names(self) -> list[str]:
        layers = range(self.config.num_hidden_layers)
        caches = [name(i) for i in layers for name in (io_names.present_key, io_names.present_value)]
        return [io_names.LOGITS, *caches, *self.extra_outputs]

    def _bind(self, first: int, count: int, decode: bool) -> None:
        """Bind rows [first, first + count) of every cache as past and present (one OrtValue each), and the
        outputs: decode's preallocated logits, or ORT-allocated ones for prefill (rebound every prefill step:
        ORT keeps an output it allocated bound, and the next step's T may differ)."""
        if decode and self._bound == (first, count, decode):
            return
        binding = self._binding
        if (first, count) not in self._views:
            wrap = self._ort.OrtValue.ortvalue_from_numpy
            span = slice(first, first + count)
            self._views[first, count] = [(wrap(k[span]), wrap(v[span])) for k, v in zip(self._k, self._v, strict=True)]
        binding.clear_binding_outputs()
        if decode and count not in self._decode_logits:
            logits = np.empty((count, 1, self.config.vocab_size), dtype=self.dtype)
            self._decode_logits[count] = (logits, self._ort.OrtValue.ortvalue_from_numpy(logits))
        if decode:
            binding.bind_ortvalue_output(io_names.LOGITS, self._decode_logits[count][1])
        else:
            binding.bind_output(io_names.LOGITS, "cpu")
        for layer, (k_view, v_view) in enumerate(self._views[first, count]):
            binding.bind_ortvalue_input(io_names.past_key(layer), k_view)
            binding.bind_ortvalue_input(io_names.past_value(layer), v_view)
            binding.bind_ortvalue_output(io_names.present_key(layer), k_view)
            binding.bind_ortvalue_output(io_names.present_value(layer), v_view)
        for name in self.extra_outputs:
            binding.bind_output(name, "cpu")
        self._bound = (first, count, decode)


def _rows_of(value: np.ndarray, order: list[int], count: int, t: int) -> np.ndarray:
    """An extra output of a range of `count` rows cut down to the step's rows in `order`: per-token values
    [count * T, ...] and per-row values [count, ...] both."""
    if order == list(range(count)):
        return value
    if value.shape[0] == count * t:
        return value.reshape(count, t, *value.shape[1:])[order].reshape(len(order) * t, *value.shape[1:])
    return value[order]


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


def _check_graph(session: Any, engine_dir: Path, config: MixtralConfig, max_seq_len: int, dtype: str) -> None:
    """Refuse an engine whose graph does not match its manifest (files copied between engines, an edited
    manifest: inputs, cache shape, cache dtype, vocabulary, each named in one line), or whose caches are not
    updated in place (an engine built before the GroupQueryAttention lowering)."""
    outputs = {o.name for o in session.get_outputs()}
    if io_names.present_key(0) not in outputs:
        raise MoetrtError(
            f"{engine_dir / MODEL_FILE}: no {io_names.present_key(0)!r} output; the engine was built by an older "
            "moetrt (attention not lowered to GroupQueryAttention): rebuild it"
        )
    inputs = {i.name: i for i in session.get_inputs()}
    expected = [io_names.INPUT_IDS, io_names.POSITION_IDS]
    expected += [name(i) for i in range(config.num_hidden_layers) for name in (io_names.past_key, io_names.past_value)]
    kv = [config.num_key_value_heads, max_seq_len, config.head_dim]
    manifest = engine_dir / MANIFEST
    if sorted(inputs) != sorted(expected) or inputs[io_names.past_key(0)].shape[1:] != kv:
        raise MoetrtError(
            f"{engine_dir / MODEL_FILE}: graph inputs do not match the manifest's model "
            f"({config.num_hidden_layers} layers, caches [batch, {', '.join(map(str, kv))}]): rebuild the engine"
        )
    graph_dtype = {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(inputs[io_names.past_key(0)].type)
    if graph_dtype != dtype:
        raise MoetrtError(f"{manifest}: field 'dtype' is {dtype!r}, the engine's graph runs {graph_dtype}")
    logits = next((o for o in session.get_outputs() if o.name == io_names.LOGITS), None)
    vocab = logits.shape[-1] if logits is not None and logits.shape else None
    if vocab != config.vocab_size:
        raise MoetrtError(
            f"{manifest}: field 'config.vocab_size' is {config.vocab_size}, the engine's graph has {vocab} logits"
        )
