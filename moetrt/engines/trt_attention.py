"""Bound the export's attention by the live cache length, for TensorRT: a shape input that slices the cache.

The exported attention reads every slot of the static caches `past_key.{i}` / `past_value.{i}` [B, KV,
max_seq_len, D] each step and masks the slots no row has written (moetrt.model.mixtral.Attention). The
TensorRT graph gets one more input, `kv_live` (`moetrt.names.KV_LIVE`, int32) of shape [L], whose LENGTH
is the number of cache slots the step reads (its values are never read): the runtime sets L >= every
row's cached length (the rows' first position, `position_ids[:, 0]`) and >= 1. In TensorRT an input's
dimension is a shape value, so L reaches the Slice layers as a build-time-checked shape (optimization
profile 1..max_seq_len), not as a data-dependent size. The rewrite, on the graph `moetrt export` writes:

- each cache input's readers (all but its `Shape` readers, which take the batch size) read
  `Slice(past, starts=[0], ends=Shape(kv_live), axes=[2])` [B, KV, L, D];
- the key positions of the cache mask, `Range(0, max_seq_len, 1)`, become `Range(0, L, 1)`, so the mask
  (causal, cached length, sliding window) is [.., L];
- each layer's split of the softmax over [cache | new] keys (`Slice(probs, 0, max_seq_len)`,
  `Slice(probs, max_seq_len, end)`) splits at L.

Every slot at or beyond L is masked for every row in the unbounded graph (its key position is >= the row's
cached length), so the bounded graph computes the same attention over the visible keys: a step reads L
slots instead of max_seq_len. tests/test_trt.py runs both graphs in ONNX Runtime over prefill, decode and
rows at different lengths (with a sliding window) and compares them; a rewrite that splits the softmax one
slot off fails that comparison.

The pattern is the exporter's; if a future export no longer has exactly one key-position Range of
max_seq_len and two softmax splits per layer, `bound_attention` refuses the graph in one line rather than
build an engine that would read the wrong slots.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moetrt import names
from moetrt.errors import MoetrtError
from moetrt.names import KV_LIVE

_FOLDABLE = ("Cast", "CastLike", "Reshape", "Squeeze", "Unsqueeze", "Identity")


def bound_attention(model: onnx.ModelProto, num_layers: int, max_seq_len: int) -> None:
    """Rewrite `model` (in place) so each layer's attention reads the first L cache slots, L = the length of
    the new graph input `KV_LIVE`; see the module docstring. Raises MoetrtError (one line) if the graph
    does not have the exporter's attention pattern."""
    graph = model.graph
    if any(i.name == KV_LIVE for i in graph.input):
        raise MoetrtError(f"the graph already has an input {KV_LIVE!r}: its attention is bounded already")
    producers = {out: node for node in graph.node for out in node.output}
    constants = _Constants(graph, producers)
    live = [
        helper.make_node("Shape", [KV_LIVE], [f"{KV_LIVE}.len"], name=f"{KV_LIVE}/Shape"),
        helper.make_node("Squeeze", [f"{KV_LIVE}.len"], [f"{KV_LIVE}.scalar"], name=f"{KV_LIVE}/Squeeze"),
        helper.make_node("Constant", [], [f"{KV_LIVE}.zero"], name=f"{KV_LIVE}/zero",
                         value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Constant", [], [f"{KV_LIVE}.axis"], name=f"{KV_LIVE}/axis",
                         value=numpy_helper.from_array(np.array([2], np.int64))),
    ]  # fmt: skip
    length, scalar, zero, axis = (n.output[0] for n in live)
    caches = [name(i) for i in range(num_layers) for name in (names.past_key, names.past_value)]
    readers = {cache: [n for n in graph.node if cache in n.input and n.op_type != "Shape"] for cache in caches}
    unread = next((cache for cache, nodes in readers.items() if not nodes), None)
    if unread is not None:
        raise MoetrtError(f"graph input {unread!r}: no reader; expected the exporter's attention")
    ranges = [n for n in graph.node if n.op_type == "Range" and constants.value(n.input[1]) == max_seq_len]
    if len(ranges) != 1:
        raise MoetrtError(
            f"found {len(ranges)} Range(0, {max_seq_len}) nodes, expected 1 (the cache mask's key positions): the "
            "export's attention does not have the pattern moetrt.engines.trt_attention bounds"
        )
    softmax_slices = [n for n in graph.node if n.op_type == "Slice" and _from_softmax(n.input[0], producers)]
    splits = [(node, index) for node in softmax_slices for index in (1, 2)  # (starts, ends) at the capacity
              if constants.value(node.input[index]) == max_seq_len]  # fmt: skip
    if len(splits) != 2 * num_layers:
        raise MoetrtError(
            f"found {len(splits)} softmax splits at {max_seq_len}, expected {2 * num_layers} (two per layer): the "
            "export's attention does not have the pattern moetrt.engines.trt_attention bounds"
        )
    # The graph is the exporter's: rewrite it.
    slices = []
    for cache in caches:
        sliced = f"{cache}.live"
        for node in readers[cache]:
            node.input[:] = [sliced if x == cache else x for x in node.input]
        slices.append(helper.make_node("Slice", [cache, zero, length, axis], [sliced], name=f"{cache}/live"))
    ranges[0].input[1] = scalar
    for node, index in splits:
        node.input[index] = length
    nodes = [*live, *slices, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info(KV_LIVE, onnx.TensorProto.INT32, [KV_LIVE]))
    del graph.value_info[:]  # shapes recorded for max_seq_len-long keys no longer hold


def _from_softmax(value: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether `value` is a Softmax output, possibly through Casts (`softmax(...).to(dtype)`)."""
    node = producers.get(value)
    while node is not None and node.op_type == "Cast":
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "Softmax"


class _Constants:
    """Scalar values of graph values computed from Constant nodes and initializers through shape-only ops."""

    def __init__(self, graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto]):
        self._producers = producers
        self._initializers = {i.name: i for i in graph.initializer}

    def value(self, name: str) -> int | None:
        """The single integer `name` holds, or None if it is not such a constant."""
        array = self._array(name, depth=0)
        if array is None or array.size != 1 or not np.isfinite(array).all():
            return None
        return int(array.reshape(()))

    def _array(self, name: str, depth: int) -> np.ndarray | None:
        if depth > 8 or not name:
            return None
        init = self._initializers.get(name)
        if init is not None:
            small = init.data_location != onnx.TensorProto.EXTERNAL and np.prod(init.dims, dtype=np.int64) <= 8
            return numpy_helper.to_array(init) if small else None
        node = self._producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name in ("value", "value_int", "value_ints")), None)
            if value is None:
                return None
            if value.name == "value":
                return numpy_helper.to_array(value.t)
            return np.asarray(helper.get_attribute_value(value))
        if node.op_type in _FOLDABLE:
            return self._array(node.input[0], depth + 1)
        return None
