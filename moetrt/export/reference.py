"""A standard-op body for `moetrt::TopKMoE`, so plain ONNX Runtime can run an exported graph.

For tests and validation only. ONNX Runtime runs a custom-domain node through a model-local function of
the same domain and name; so would the TensorRT parser, *before* trying the plugin. That is why the
exporter never writes this function to disk: attach it to an in-memory copy with `with_reference_function`.

The body is dense (every expert runs on every token, weighted by a scatter of the top-k weights), which
is exact but slow; the ORT engine lowers TopKMoE to `com.microsoft::MoE` instead.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from moetrt.plugins import contract
from moetrt.plugins.onnx_route import contract_topk_nodes


def _node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], **attrs)


def _attr_constant(output: str, attribute: str) -> onnx.NodeProto:
    """`Constant` whose int value is the calling node's attribute `attribute` (a function attribute ref)."""
    node = helper.make_node("Constant", [], [output])
    node.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attribute))
    return node


def topk_moe_function(opset: int) -> onnx.FunctionProto:
    """The contract's semantics (moetrt/plugins/contract.py) in standard ops of the default domain at `opset`.

    Router logits in the model dtype, softmax / top-k (`contract_topk_nodes`: the contract's tie rule) /
    renormalisation and the weighted sum in fp32.
    """
    c = helper.make_tensor
    nodes = [
        helper.make_node("Constant", [], ["axis0"], value=c("axis0", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["axis_last"], value=c("axis_last", TensorProto.INT64, [1], [-1])),
        helper.make_node("Constant", [], ["one"], value=c("one", TensorProto.FLOAT, [], [1.0])),
        # routing: p = softmax(fp32(x @ router^T)); top-k; optional renormalisation (normalize is 0 or 1)
        _node("Transpose", ["router_weight"], "router_t", perm=[1, 0]),
        _node("MatMul", ["hidden", "router_t"], "logits"),
        _node("Cast", ["logits"], "logits32", to=TensorProto.FLOAT),
        _node("Softmax", ["logits32"], "probs", axis=-1),
        _attr_constant("k_scalar", "top_k"),
        _node("Unsqueeze", ["k_scalar", "axis0"], "k"),
        *contract_topk_nodes("probs", "k", "top_p", "top_e"),
        _node("Shape", ["probs"], "probs_shape"),
        _node("ReduceSum", ["top_p", "axis_last"], "top_sum", keepdims=1),
        _attr_constant("normalize_int", "normalize"),
        _node("Cast", ["normalize_int"], "normalize_f", to=TensorProto.FLOAT),
        _node("Mul", ["top_sum", "normalize_f"], "scaled_sum"),
        _node("Sub", ["one", "normalize_f"], "keep"),
        _node("Add", ["scaled_sum", "keep"], "denominator"),  # sum(top_p) if normalize else 1
        _node("Div", ["top_p", "denominator"], "top_w"),
        helper.make_node("ConstantOfShape", ["probs_shape"], ["zeros"], value=c("zero", TensorProto.FLOAT, [1], [0.0])),
        _node("ScatterElements", ["zeros", "top_e", "top_w"], "dense_w", axis=1),  # [T, E]
        _node("Transpose", ["dense_w"], "dense_w_t", perm=[1, 0]),
        _node("Unsqueeze", ["dense_w_t", "axis_last"], "expert_w"),  # [E, T, 1]
        # every expert on every row: y[e] = (silu(x w1[e]^T) * (x w3[e]^T)) w2[e]^T  -> [E, T, H]
        _node("Unsqueeze", ["hidden", "axis0"], "x"),  # [1, T, H]
        _node("Transpose", ["w1"], "w1_t", perm=[0, 2, 1]),
        _node("Transpose", ["w3"], "w3_t", perm=[0, 2, 1]),
        _node("Transpose", ["w2"], "w2_t", perm=[0, 2, 1]),
        _node("MatMul", ["x", "w1_t"], "gate"),
        _node("Sigmoid", ["gate"], "gate_sigmoid"),
        _node("Mul", ["gate", "gate_sigmoid"], "gate_silu"),
        _node("MatMul", ["x", "w3_t"], "up"),
        _node("Mul", ["gate_silu", "up"], "act"),
        _node("MatMul", ["act", "w2_t"], "y"),
        _node("Cast", ["y"], "y32", to=TensorProto.FLOAT),
        _node("Mul", ["y32", "expert_w"], "weighted"),
        _node("ReduceSum", ["weighted", "axis0"], "out32", keepdims=0),
        _node("CastLike", ["out32", "hidden"], contract.OUTPUTS[0]),
    ]
    return helper.make_function(
        contract.DOMAIN,
        contract.OP_TYPE,
        list(contract.INPUTS),
        list(contract.OUTPUTS),
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(contract.ATTRIBUTE_TYPES),
    )


def with_reference_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` carrying the reference TopKMoE function (never save it where TensorRT reads)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    out.functions.append(topk_moe_function(opset))
    return out
