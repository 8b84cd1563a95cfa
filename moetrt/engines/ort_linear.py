"""Quantize the dense projections of an int8/int4 engine: `MatMul(x, W)` -> `com.microsoft::MatMulNBits`.

The experts are the bulk of a Mixtral, but at decode the 2-of-8 experts a token reads are only part of its
bytes: on the mid preset an fp32 token reads 705 MB of experts, 84 MB of attention and 131 MB of lm_head.
With the experts alone in int8 the bandwidth bound of a decode step moves from 26 to ~60 tok/s; with
attention and lm_head in the same precision (what llama.cpp's q8_0 and ORT GenAI's builder do) to ~100.
So every MatMul whose second input is a 2-D float initializer becomes MatMulNBits with the experts'
QuantSpec (same block, same symmetric scales, accuracy_level 4: at level 0 the 8-bit CPU kernel
dequantizes per call and was 50x slower on lm_head). The routers stay float (`keep`): their logits choose
the experts, and a flipped choice costs far more than the bytes saved. Embeddings are a Gather of one row
per token and stay float too.

MatMulNBits computes A @ dequant(B)^T with B stored [N, k_blocks, blob]: row n of the Linear weight [N, K],
which is the transpose of the MatMul's [K, N] initializer. Weights are quantized lazily, one at a time, as
the engine is written (ort_quant.LazyQuantized).
"""

from __future__ import annotations

from collections.abc import Collection

import onnx_ir as ir

from moetrt.engines.ort_lowering import MS_DOMAIN, register_initializer, replace_node
from moetrt.engines.ort_quant import LazyQuantized, QuantSpec


def quantize_linear_weights(model: ir.Model, spec: QuantSpec, keep: Collection[str] = ()) -> list[str]:
    """Replace each float-weight MatMul not named in `keep` by MatMulNBits; returns the replaced node names.

    Output values keep their names, so graph outputs and extra outputs requested by name still resolve.
    """
    graph = model.graph
    replaced = []
    for node in list(graph):
        weight = node.inputs[1] if (node.domain, node.op_type) == ("", "MatMul") and node.name not in keep else None
        tensor = weight.const_value if weight is not None else None
        if tensor is None or len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
            continue
        k, n = (int(d) for d in tensor.shape)
        quantized = LazyQuantized(lambda _, t=tensor: t.numpy().T, 1, n, k, spec, tensor.dtype)
        (_, row_bytes), (_, blocks) = spec.packed_shape(n, k)
        lazy = quantized.tensors({"weight": (n, blocks, row_bytes // blocks), "scales": (n, blocks)})
        b, s = (register_initializer(graph, f"{weight.name}.q{spec.bits}.{part}", lazy[part]) for part in lazy)
        attrs = [ir.AttrInt64(a, v) for a, v in
                 (("K", k), ("N", n), ("bits", spec.bits), ("block_size", spec.block),
                  ("accuracy_level", spec.accuracy_level))]  # fmt: skip
        replace_node(graph, node, [ir.Node(MS_DOMAIN, "MatMulNBits", [node.inputs[0], b, s], attributes=attrs,
                                           name=node.name)])  # fmt: skip
        replaced.append(str(node.name))
    if replaced:
        graph.opset_imports[MS_DOMAIN] = 1
    return replaced
