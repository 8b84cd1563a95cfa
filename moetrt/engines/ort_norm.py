"""Fuse each residual Add + RMSNorm into `com.microsoft::SkipSimplifiedLayerNormalization`, in place.

The export writes RMSNorm as Pow-ReduceMean-Add-Sqrt-Div-Mul (moetrt.model.mixtral.RMSNorm), which ONNX
Runtime's CPU optimizer fuses into SimplifiedLayerNormalization, but it leaves the residual Add in front of
it: ORT's SkipLayerNormFusion runs for GPU execution providers only (checked on ORT 1.32: the optimized CPU
graph keeps every Add + SimplifiedLayerNormalization pair). The contrib op (onnxruntime
docs/ContribOperators.md) computes both in one pass, as ORT GenAI's Mistral graph does:

    y, _, _, sum = SkipSimplifiedLayerNormalization(input, skip, gamma, epsilon=eps)
    sum = input + skip;  y = gamma * sum / sqrt(mean(sum^2, axis=-1) + eps)

Matched on fp32 graphs (an fp16/bf16 export casts to fp32 around the norm and is left to ORT): every norm
whose input is an Add of two computed values - each post-attention norm, each later layer's input norm and
the final norm. The first layer's input norm reads the embedding and stays as it is.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common

from moetrt.engines.ort_lowering import MS_DOMAIN


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """Replace every residual Add + RMSNorm chain of `model` by SkipSimplifiedLayerNormalization; returns the
    count. The norm's output keeps its name (e.g. layers.{i}.attn_input), the sum takes over the Add's uses."""
    graph = model.graph
    fused = 0
    for div in [n for n in graph if _is(n, "Div")]:
        match = _match(graph, div)
        if match is None:
            continue
        residual, mul, gamma, eps = match
        node = ir.Node(
            MS_DOMAIN,
            "SkipSimplifiedLayerNormalization",
            [*residual.inputs, gamma],
            attributes=[ir.AttrFloat32("epsilon", eps)],
            num_outputs=4,
            name=f"{mul.name}.skip_norm",
        )
        graph.insert_after(residual, node)
        y, total = node.outputs[0], node.outputs[3]
        for new, old in ((y, mul.outputs[0]), (total, residual.outputs[0])):
            new.dtype, new.shape = old.dtype, old.shape
            ir.convenience.replace_all_uses_with(old, new)
            name, old.name = old.name, None
            new.name = name
        fused += 1
    if fused:
        graph.opset_imports[MS_DOMAIN] = 1
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    return fused


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.domain == "" and node.op_type == op_type


def _match(graph: ir.Graph, div: ir.Node) -> tuple[ir.Node, ir.Node, ir.Value, float] | None:
    """For Div(a, Sqrt(Add(ReduceMean(Pow(a, 2)), eps))) with a = Add(x, y) of two computed values and the
    Div read only by Mul(gamma, .) with gamma an fp32 initializer: (the residual Add, the Mul, gamma, eps)."""
    a, denominator = div.inputs
    sqrt = denominator.producer() if denominator is not None else None
    add_eps = sqrt.inputs[0].producer() if _is(sqrt, "Sqrt") else None
    if not _is(add_eps, "Add") or a is None or a.dtype != ir.DataType.FLOAT:
        return None
    mean, eps = (add_eps.inputs[0].producer(), ir.convenience.get_const_tensor(add_eps.inputs[1]))
    power = mean.inputs[0].producer() if _is(mean, "ReduceMean") else None
    if not _is(power, "Pow") or power.inputs[0] is not a or eps is None:
        return None
    exponent = ir.convenience.get_const_tensor(power.inputs[1])
    residual = a.producer()
    computed = _is(residual, "Add") and all(v is not None and v.const_value is None for v in residual.inputs)
    uses = list(div.outputs[0].uses())
    mul = uses[0].node if len(uses) == 1 else None
    if exponent is None or float(exponent.numpy()) != 2.0 or not computed or not _is(mul, "Mul"):
        return None
    gamma = next((v for v in mul.inputs if v is not div.outputs[0]), None)
    if gamma is None or gamma.const_value is None or len(gamma.shape) != 1:
        return None
    return residual, mul, gamma, float(eps.numpy())
