"""Lower every `moetrt::TopKMoE` node (contract: moetrt/plugins/contract.py) to ONNX Runtime's CPU MoE
kernels, in place on an onnx_ir model whose weights are still on disk.

Per node, for layer prefix P (`layers.{i}` from the output name `layers.{i}.moe_output`):
    P.router_logits = MatMul(hidden, router_weight^T)               fp32 at every precision
    P.moe_output    = com.microsoft::MoE(hidden, P.router_logits, fc1, "", fc2)                 precision fp32
                    | com.microsoft::QMoE(hidden, P.router_logits, q1, s1, "", q2, s2)         int8 / int4
The contract's routing itself (fp32 softmax, top-k with ties to the higher index, renormalisation) is added
as the model-local function `names.ROUTE_FUNCTION`: router_logits [T, E] -> expert_ids [T, k] int64,
expert_weights [T, k] fp32 (moetrt.plugins.onnx_route: the tie rule the MoE kernel follows too, so
expert_ids name the experts the kernel ran). Nothing calls it in the saved graph, so it costs nothing; a
loader asked for `layers.{i}.expert_ids` adds one call node on that layer's router_logits (runtime.ort_session).
Both kernels take router LOGITS (they apply the softmax), k = top_k, normalize_routing_weights = normalize,
activation_type="swiglu" with swiglu_fusion=1: fc1 [E, 2F, H] holds w1 and w3 rows interleaved
(fc1[:, 0::2] = w1, fc1[:, 1::2] = w3) and fc2 = w2 [E, H, F]. The default activation_alpha=1 and
activation_beta=0 with no swiglu_limit make the kernel's SwiGLU exactly silu(w1 x) * (w3 x).
ORT accepts other layouts (gate|up concatenated, [E, H, N]) without complaint and returns wrong numbers,
so tests/test_ort_engine.py checks this lowering against `sparse_moe` and shows the wrong ones fail.
Tie rule: ORT picks the higher expert index among exactly equal probabilities, as the contract does.

Slices (fp32): ORT's CPU MoE splits the EXPERTS between its threads in contiguous index ranges and runs each
expert's GEMMs single-threaded, so at decode (one token, k experts) the work is balanced only when the k
chosen experts fall in different ranges (2 threads, top-2 of 8: 57% of tokens). With `slices` S > 1 every
expert is cut along F into S slices and slice s of expert j becomes expert s*E + j: fc1 [S*E, 2F/S, H],
fc2 [S*E, H, F/S] * S, router logits tiled S times (Concat) and k = S*top_k. Each chosen expert's S copies
have equal probabilities, so the top S*k are exactly the S slices of the top k; each copy's renormalized
weight is 1/S of the expert's, which the fc2 scale by S undoes (exact for S a power of two); SwiGLU is
elementwise in F and fc2 linear in it, so the slices sum to the expert. Thread t then owns slice t of every
expert: one token's work splits evenly. Mid preset fp32 engine, 2 threads (`benchmarks/profile_ort.py`, two
runs each): MoE 30.7 -> 26.4 ms of a decode step, prefill MoE 760 -> 751 ms. The one deviation from the
contract: among experts EXACTLY tied at the k-th place, ORT's higher-index-first order interleaves the
copies (slice S-1 of every tied expert outranks slice 0 of any), so a slice of each may be chosen; no copy
layout that keeps the thread balance avoids it. A checkpoint with exact router ties needs `--threads 1`.
QMoE parallelizes inside each expert already (no gain measured), so quantized engines are not sliced.

New weights are `onnx_ir.LazyTensor`s computed from the (memory-mapped) export weights when the engine is
saved, one tensor at a time, so building never holds the whole model in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from moetrt import names
from moetrt.engines.ort_quant import LazyQuantized, QuantSpec
from moetrt.errors import MoetrtError
from moetrt.plugins import contract
from moetrt.plugins.onnx_route import contract_topk_nodes

MS_DOMAIN = "com.microsoft"
# int8: ORT's block-wise 8-bit QMoE has no fp32-activation kernel (it quantizes activations to int8 at any
# accuracy level) but is ~3x faster than fp32 MoE at decode; per-channel int8 dequantizes whole experts
# and is slower than fp32. int4: accuracy_level=4 (int8 activations) is ~4x faster than level 0 at decode.
PRECISIONS: dict[str, QuantSpec | None] = {
    "fp32": None,
    "int8": QuantSpec(bits=8, block=32, accuracy_level=4),
    "int4": QuantSpec(bits=4, block=32, accuracy_level=4),
}


def router_matmul(layer: int) -> str:
    """Name of the layer's router MatMul node (kept float by every precision)."""
    return f"{names.layer_prefix(layer)}.router"


def moe_slices(threads: int, intermediate_size: int) -> int:
    """Slices for an fp32 MoE served by `threads` threads: the largest divisor of F not above `threads`."""
    return max(s for s in range(1, max(threads, 1) + 1) if intermediate_size % s == 0)


def lower_topk_moe(model: ir.Model, precision: str, slices: int = 1) -> list[str]:
    """Replace every TopKMoE node of `model` for `precision`; returns the lowered layers' indices in order.

    slices: cut each fp32 expert into this many slices along F (module docstring); quantized: must be 1.

    The TopKMoE inputs' values keep their names; the original expert initializers are dropped once unused.
    Model-local functions of the moetrt domain (reference implementations) and its opset import go too.
    """
    if precision not in PRECISIONS:
        raise MoetrtError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    graph = model.graph
    nodes = [n for n in graph if (n.domain, n.op_type) == (contract.DOMAIN, contract.OP_TYPE)]
    if slices != 1 and PRECISIONS[precision] is not None:
        raise MoetrtError(f"precision {precision}: experts are sliced for fp32 only (slices={slices})")
    layers = [_lower_node(graph, node, PRECISIONS[precision], slices) for node in nodes]
    if layers:
        graph.opset_imports[MS_DOMAIN] = 1
        routing = {(n.attributes.get_int("top_k"), n.attributes.get_int("normalize", 1)) for n in nodes}
        if len(routing) != 1:
            raise MoetrtError(f"TopKMoE nodes disagree on (top_k, normalize): {sorted(routing)}; expected one routing")
        top_k, normalize = routing.pop()
        function = route_function(top_k, bool(normalize), graph.opset_imports[""])
        model.functions[function.identifier()] = function
        graph.opset_imports[function.domain] = 1
    if not any(n.domain == contract.DOMAIN for n in graph.all_nodes()):
        graph.opset_imports.pop(contract.DOMAIN, None)
        model.opset_imports.pop(contract.DOMAIN, None)
        for key in [k for k in model.functions if k[0] == contract.DOMAIN]:
            del model.functions[key]
    return layers


def _lower_node(graph: ir.Graph, node: ir.Node, spec: QuantSpec | None, slices: int) -> int:
    out = node.outputs[0]
    layer = names.layer_of(str(out.name))
    prefix = names.layer_prefix(layer)
    if len(node.inputs) != len(contract.INPUTS):
        raise MoetrtError(f"TopKMoE node {node.name!r}: expected inputs {contract.INPUTS}, found {len(node.inputs)}")
    hidden = node.inputs[0]
    router, w1, w3, w2 = (_initializer(node, i) for i in range(1, 5))
    e, f, h = w1.shape
    top_k = node.attributes.get_int("top_k")
    normalize = node.attributes.get_int("normalize", 1)
    if top_k is None or not 1 <= top_k <= e:
        raise MoetrtError(f"TopKMoE node {node.name!r}: attribute top_k={top_k!r}; expected 1..{e}")
    dtype = w1.dtype

    router_t = register_initializer(
        graph, f"{prefix}.router_weight_t", _lazy(lambda: _transposed(router), router.dtype, (h, e))
    )
    matmul = ir.Node("", "MatMul", [hidden, router_t], name=router_matmul(layer))
    logits = matmul.outputs[0]
    logits.name = names.router_logits(layer)
    logits.dtype = router.dtype
    logits.shape = ir.Shape([hidden.shape[0] if hidden.shape is not None else None, e])

    attrs = {
        "k": top_k,
        "activation_type": "swiglu",
        "swiglu_fusion": 1,
        "normalize_routing_weights": int(normalize),
    }
    new_nodes = [matmul]
    if spec is None:
        if slices < 1 or f % slices:
            raise MoetrtError(f"TopKMoE node {node.name!r}: slices={slices} must divide intermediate size {f}")
        fc1_shape = (slices * e, 2 * f // slices, h)
        fc1 = register_initializer(graph, f"{prefix}.moe_fc1", _lazy(lambda: _fc1(w1, w3, slices), dtype, fc1_shape))
        fc2, moe_logits = _value_of(node, 4), logits
        if slices > 1:
            fc2_shape = (slices * e, h, f // slices)
            fc2 = register_initializer(graph, f"{prefix}.moe_fc2", _lazy(lambda: _fc2(w2, slices), dtype, fc2_shape))
            tile = ir.Node("", "Concat", [logits] * slices, attributes=[ir.AttrInt64("axis", -1)],
                           name=f"{prefix}.router_slices")  # fmt: skip
            new_nodes.append(tile)
            moe_logits = tile.outputs[0]
            attrs["k"] = top_k * slices
        moe = ir.Node(MS_DOMAIN, "MoE", [hidden, moe_logits, fc1, None, fc2], attributes=_attrs(attrs))
    else:
        if h % spec.block or f % spec.block:
            raise MoetrtError(
                f"TopKMoE node {node.name!r}: {spec.bits}-bit block quantization needs hidden size ({h}) and "
                f"intermediate size ({f}) divisible by {spec.block}"
            )
        fc1_q = LazyQuantized(lambda j: _interleaved_expert(w1, w3, j), e, 2 * f, h, spec, dtype)
        fc2_q = LazyQuantized(lambda j: w2.numpy()[j], e, h, f, spec, dtype)
        q1, s1 = (register_initializer(graph, f"{prefix}.moe_fc1_{part}", t) for part, t in fc1_q.tensors().items())
        q2, s2 = (register_initializer(graph, f"{prefix}.moe_fc2_{part}", t) for part, t in fc2_q.tensors().items())
        attrs |= {"expert_weight_bits": spec.bits, "block_size": spec.block, "accuracy_level": spec.accuracy_level}
        moe = ir.Node(MS_DOMAIN, "QMoE", [hidden, logits, q1, s1, None, q2, s2], attributes=_attrs(attrs))
    moe.name = f"{prefix}.moe"
    replace_node(graph, node, [*new_nodes, moe])
    return layer


def route_function(top_k: int, normalize: bool, opset: int) -> ir.Function:
    """`names.ROUTE_FUNCTION`: the contract's routing of router logits [T, E] (any float dtype) as standard ops:
    Cast to fp32 -> Softmax -> the contract's top-k (`contract_topk_nodes`, ties to the higher expert index,
    as the MoE kernel) -> expert_ids [T, k] int64 and expert_weights [T, k] fp32, divided by their sum when
    `normalize`."""
    c = helper.make_tensor
    weights = "top_p" if normalize else "expert_weights"
    nodes = [
        helper.make_node("Cast", ["router_logits"], ["logits32"], to=TensorProto.FLOAT),
        helper.make_node("Softmax", ["logits32"], ["probs"], axis=-1),
        helper.make_node("Constant", [], ["k"], value=c("k", TensorProto.INT64, [1], [top_k])),
        *contract_topk_nodes("probs", "k", weights, "expert_ids"),
    ]
    if normalize:
        nodes += [
            helper.make_node("Constant", [], ["axes"], value=c("axes", TensorProto.INT64, [1], [-1])),
            helper.make_node("ReduceSum", ["top_p", "axes"], ["top_sum"], keepdims=1),
            helper.make_node("Div", ["top_p", "top_sum"], ["expert_weights"]),
        ]
    domain, name = names.ROUTE_FUNCTION
    proto = helper.make_function(
        domain, name, ["router_logits"], ["expert_ids", "expert_weights"], nodes, [helper.make_opsetid("", opset)]
    )
    return ir.serde.deserialize_function(proto)


def replace_node(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Put `new_nodes` where `node` was; the last one's output takes over the old output's uses, name, type and
    shape; initializers only the old node read are dropped."""
    out, new_out = node.outputs[0], new_nodes[-1].outputs[0]
    new_out.dtype, new_out.shape = out.dtype, out.shape
    graph.insert_before(node, new_nodes)
    ir.convenience.replace_all_uses_with(out, new_out, replace_graph_outputs=True)
    old_inputs = list(node.inputs)
    graph.remove(node, safe=True)
    new_out.name = out.name
    for value in old_inputs:
        if value is not None and not value.uses() and value.name in graph.initializers:
            del graph.initializers[value.name]


def _value_of(node: ir.Node, index: int) -> ir.Value:
    value = node.inputs[index]
    assert value is not None  # checked by _initializer
    return value


def _initializer(node: ir.Node, index: int) -> ir.TensorProtocol:
    value = node.inputs[index]
    if value is None or value.const_value is None:
        name = contract.INPUTS[index]
        raise MoetrtError(f"TopKMoE node {node.name!r}: input {name!r} must be a graph initializer (the contract)")
    return value.const_value


def _attrs(values: dict[str, int | str]) -> list[ir.Attr]:
    return [ir.AttrString(k, v) if isinstance(v, str) else ir.AttrInt64(k, v) for k, v in values.items()]


def register_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _lazy(func: Callable[[], np.ndarray], dtype: ir.DataType, shape: tuple[int, ...]) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.Tensor(func(), dtype=dtype), dtype=dtype, shape=ir.Shape(shape))


def _transposed(w: ir.TensorProtocol) -> np.ndarray:
    return np.ascontiguousarray(w.numpy().T)


def _fc1(w1: ir.TensorProtocol, w3: ir.TensorProtocol, slices: int) -> np.ndarray:
    """fc1 [S*E, 2F/S, H]: for slice s, fc1[s*E:(s+1)*E] holds w1 and w3 rows s*F/S..(s+1)*F/S interleaved
    (rows 0::2 = w1, 1::2 = w3; swiglu_fusion=1)."""
    a, b = w1.numpy(), w3.numpy()
    e, f, h = a.shape
    out = np.empty((slices * e, 2 * f // slices, h), dtype=a.dtype)
    for s, cols in enumerate(np.split(np.arange(f), slices)):
        out[s * e : (s + 1) * e, 0::2] = a[:, cols]
        out[s * e : (s + 1) * e, 1::2] = b[:, cols]
    return out


def _fc2(w2: ir.TensorProtocol, slices: int) -> np.ndarray:
    """fc2 [S*E, H, F/S]: slice s of every expert's w2 columns, times S (module docstring)."""
    return np.concatenate(np.split(w2.numpy(), slices, axis=2), axis=0) * np.asarray(slices, w2.numpy().dtype)


def _interleaved_expert(w1: ir.TensorProtocol, w3: ir.TensorProtocol, expert: int) -> np.ndarray:
    a, b = w1.numpy()[expert], w3.numpy()[expert]
    out = np.empty((2 * a.shape[0], a.shape[1]), dtype=a.dtype)
    out[0::2] = a
    out[1::2] = b
    return out
