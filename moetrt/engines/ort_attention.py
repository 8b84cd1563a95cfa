"""Lower each layer's attention to `com.microsoft::GroupQueryAttention`, in place on an onnx_ir model.

The export computes attention over the WHOLE static cache every step (masked), so a step costs what the
cache's capacity costs. ORT's GroupQueryAttention (contrib op spec: onnxruntime docs/ContribOperators.md;
the layout ORT GenAI's model builder emits for Mistral) reads each row's real length instead:

    per layer i, between the export's `layers.{i}.attn_input` [B, T, H] and `layers.{i}.attn_output` [B, T, N*D]:
      qkv = MatMul(attn_input, Wqkv)                  Wqkv [H, (N + 2*KV)*D] = [Wq; Wk; Wv]^T (one packed MatMul)
      attn_output, present_key.{i}, present_value.{i} =
          GroupQueryAttention(qkv, "", "", past_key.{i}, past_value.{i}, seqlens_k, total_sequence_length,
                              cos_cache, sin_cache)
          num_heads=N, kv_num_heads=KV, scale=1/sqrt(D), do_rotary=1, rotary_interleaved=0 (rotate_half),
          local_window_size=sliding_window (a query at p sees keys p - W < j <= p, as in transformers;
          measured on ORT 1.32: W - 1 and W + 1 both fail the engine-vs-eager check), or -1 without a window
    shared by every layer, from position_ids [B, T] (each row's positions are consecutive):
      seqlens_k = int32(position_ids[:, -1])               [B]  each row's total length - 1
      total_sequence_length = max(seqlens_k) + 1           int32 scalar
      cos_cache, sin_cache [max_seq_len, D/2]: cos/sin(p * theta^(-2j/D)), fp32 math, stored in the model dtype

The caches are BNSH [B, KV, max_seq_len, D]. When the runtime binds present_key.{i} to the SAME buffer as
past_key.{i}, the kernel writes the step's (rotated) K/V at each row's positions in place and leaves every
other slot untouched; row b then attends to slots [0, seqlens_k[b] + 1) of its cache (rotary positions are
past length + t, i.e. the rows' position_ids). Without shared buffers (e.g. Polygraphy feeding numpy caches)
ORT copies the past into a new present first: the same numbers, slower.
With T > 1 the kernel treats the step as a first prompt (no past) exactly when total_sequence_length == T,
i.e. every row starts at position 0 - which is then true. Otherwise each row's past is seqlens_k[b] + 1 - T.

The old subgraph (RoPE tables, masks, per-head matmuls, the new_key/new_value outputs) is left without uses
and removed; the q/k/v weights give way to the packed one. tests/test_ort_engine.py checks the lowered
engine against the eager model and shows that wrong layouts (interleaved rotary, swapped K/V, a window off
by one) fail the same check.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from moetrt import names
from moetrt.engines.ort_lowering import MS_DOMAIN, register_initializer
from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig

SEQLENS_K = "attention.seqlens_k"
TOTAL_SEQUENCE_LENGTH = "attention.total_sequence_length"
COS_CACHE, SIN_CACHE = "attention.cos_cache", "attention.sin_cache"


GQA_HEAD_MULTIPLE = 16  # ORT's CPU kernel refuses other head sizes at run time ("head_size shall be a multiple of 16")


def qkv_matmul(layer: int) -> str:
    """Name of the layer's packed q/k/v projection node."""
    return f"{names.layer_prefix(layer)}.self_attn.qkv_proj"


def lower_attention(model: ir.Model, config: MixtralConfig, max_seq_len: int) -> list[int]:
    """Replace every layer's attention by GroupQueryAttention over shared past/present caches (module
    docstring); returns the lowered layers. Graph outputs new_key.{i}/new_value.{i} become
    present_key.{i}/present_value.{i} [batch, kv_heads, max_seq_len, head_dim]. MoetrtError (one line) if the
    graph lacks the export's attention boundary names (an export from an older moetrt)."""
    if config.head_dim % GQA_HEAD_MULTIPLE:
        raise MoetrtError(
            f"head_dim {config.head_dim}: ONNX Runtime's CPU GroupQueryAttention needs a multiple of "
            f"{GQA_HEAD_MULTIPLE} (Mixtral's is 128); this model cannot be built into an ORT engine"
        )
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs}
    layers = range(config.num_hidden_layers)
    missing = [n for i in layers for n in (names.attn_input(i), names.attn_output(i)) if n not in values]
    if missing:
        raise MoetrtError(f"the exported graph has no value {missing[0]!r}; re-export it with this moetrt")
    dtype = graph.inputs[[v.name for v in graph.inputs].index(names.past_key(0))].dtype
    seqlens, total, shared = _sequence_lengths(graph)
    graph.insert_before(next(iter(graph)), shared)  # they read only position_ids, a graph input
    cos, sin = _rotary_caches(graph, config, max_seq_len, dtype)
    outputs = {v.name: v for v in graph.outputs}
    for i in layers:
        old = values[names.attn_output(i)]
        matmul, gqa = _lower_layer(graph, config, i, values[names.attn_input(i)], seqlens, total, cos, sin)
        graph.insert_before(old.producer(), [matmul, gqa])
        out = gqa.outputs[0]
        out.dtype, out.shape = old.dtype, old.shape
        ir.convenience.replace_all_uses_with(old, out)
        old.name = f"{old.name}.unlowered"
        out.name = names.attn_output(i)
        for name in (names.new_key(i), names.new_value(i)):
            graph.outputs.remove(outputs[name])
        graph.outputs.extend(gqa.outputs[1:])
    graph.opset_imports[MS_DOMAIN] = 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    for name in [n for n, v in graph.initializers.items() if not v.uses()]:
        del graph.initializers[name]
    return list(layers)


def _sequence_lengths(graph: ir.Graph) -> tuple[ir.Value, ir.Value, list[ir.Node]]:
    """seqlens_k [B] and total_sequence_length (scalar), both int32, from position_ids; and their nodes."""
    position_ids = next(v for v in graph.inputs if v.name == names.POSITION_IDS)
    last = ir.Value(name="attention.last_index", const_value=ir.tensor(np.array(-1, dtype=np.int64)))
    one = ir.Value(name="attention.one", const_value=ir.tensor(np.array(1, dtype=np.int32)))
    for value in (last, one):
        value.type, value.shape = ir.TensorType(value.const_value.dtype), ir.Shape([])
        graph.register_initializer(value)
    gather = ir.Node("", "Gather", [position_ids, last], attributes=[ir.AttrInt64("axis", 1)], name="attention.last")
    cast = ir.Node("", "Cast", [gather.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.INT32)],
                   name="attention.seqlens_k")  # fmt: skip
    reduce = ir.Node("", "ReduceMax", [cast.outputs[0]], attributes=[ir.AttrInt64("keepdims", 0)],
                     name="attention.max_seqlen")  # fmt: skip
    add = ir.Node("", "Add", [reduce.outputs[0], one], name="attention.total_sequence_length")
    seqlens, total = cast.outputs[0], add.outputs[0]
    seqlens.name, seqlens.dtype, seqlens.shape = SEQLENS_K, ir.DataType.INT32, ir.Shape([position_ids.shape[0]])
    total.name, total.dtype, total.shape = TOTAL_SEQUENCE_LENGTH, ir.DataType.INT32, ir.Shape([])
    return seqlens, total, [gather, cast, reduce, add]


def rotary_tables(config: MixtralConfig, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_seq_len, head_dim/2] fp32: angle(p, j) = p * theta^(-2j/D), the half-split RoPE of
    transformers' Mixtral (rotate_half) and moetrt.model.mixtral.rope_tables, computed in fp32 like both."""
    d = config.head_dim
    inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / d))
    angles = np.arange(max_seq_len, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotary_caches(
    graph: ir.Graph, config: MixtralConfig, max_seq_len: int, dtype: ir.DataType
) -> tuple[ir.Value, ir.Value]:
    cos, sin = rotary_tables(config, max_seq_len)
    return tuple(
        register_initializer(graph, name, ir.Tensor(table.astype(dtype.numpy()), dtype=dtype))
        for name, table in ((COS_CACHE, cos), (SIN_CACHE, sin))
    )


def _lower_layer(
    graph: ir.Graph,
    config: MixtralConfig,
    layer: int,
    attn_input: ir.Value,
    seqlens: ir.Value,
    total: ir.Value,
    cos: ir.Value,
    sin: ir.Value,
) -> tuple[ir.Node, ir.Node]:
    """The packed q/k/v MatMul and the GroupQueryAttention node of one layer (module docstring)."""
    prefix = f"{names.layer_prefix(layer)}.self_attn"
    weights = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        value = graph.initializers.get(f"{prefix}.{proj}.weight")
        if value is None or value.const_value is None:
            raise MoetrtError(f"the exported graph has no initializer {prefix}.{proj}.weight; re-export it")
        weights.append(value.const_value)
    n, kv, d, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    width = (n + 2 * kv) * d
    if [tuple(w.shape) for w in weights] != [(n * d, h), (kv * d, h), (kv * d, h)]:
        raise MoetrtError(f"{prefix}: q/k/v_proj weights {[tuple(w.shape) for w in weights]} do not match the config")
    dtype = weights[0].dtype
    packed = ir.LazyTensor(
        lambda: ir.Tensor(np.ascontiguousarray(np.concatenate([w.numpy() for w in weights]).T), dtype=dtype),
        dtype=dtype,
        shape=ir.Shape([h, width]),
    )
    qkv_weight = register_initializer(graph, f"{prefix}.qkv_proj.weight.T", packed)
    matmul = ir.Node("", "MatMul", [attn_input, qkv_weight], name=qkv_matmul(layer))
    matmul.outputs[0].dtype = dtype
    past = {v.name: v for v in graph.inputs}
    window = config.sliding_window if config.sliding_window is not None else -1
    attrs = [
        ir.AttrInt64("num_heads", n),
        ir.AttrInt64("kv_num_heads", kv),
        ir.AttrFloat32("scale", 1.0 / math.sqrt(d)),
        ir.AttrInt64("do_rotary", 1),
        ir.AttrInt64("rotary_interleaved", 0),
        ir.AttrInt64("local_window_size", window),
    ]
    inputs = [matmul.outputs[0], None, None, past[names.past_key(layer)], past[names.past_value(layer)], seqlens,
              total, cos, sin]  # fmt: skip
    gqa = ir.Node(MS_DOMAIN, "GroupQueryAttention", inputs, attributes=attrs, num_outputs=3, name=f"{prefix}.gqa")
    cache_shape = past[names.past_key(layer)].shape
    for out, name in zip(gqa.outputs[1:], (names.present_key(layer), names.present_value(layer)), strict=True):
        out.name, out.dtype, out.shape = name, dtype, cache_shape
    return matmul, gqa
