"""The contract's top-k selection (moetrt/plugins/contract.py, Semantics) in standard ONNX ops, shared by every
ONNX body that routes: the reference TopKMoE function (moetrt/export/reference.py) and the routing function
an ORT engine carries for routing statistics (moetrt/engines/ort_lowering.py).

ONNX TopK keeps the LOWER index first among equal values (ONNX operator spec, TopK); the contract ranks the
HIGHER index first (as ONNX Runtime's MoE/QMoE kernels do), so TopK runs on the probabilities in reverse
expert order and its indices are mapped back: e = E - 1 - r.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper


def contract_topk_nodes(probs: str, k: str, top_p: str, top_e: str, prefix: str = "route") -> list[onnx.NodeProto]:
    """Nodes computing, from fp32 probabilities `probs` [T, E] and an int64 [1] tensor `k`, the top-k
    probabilities `top_p` [T, k] (descending) and their expert indices `top_e` [T, k] int64 under the contract's
    tie rule. Intermediate names start with `prefix`."""

    def name(suffix: str) -> str:
        return f"{prefix}_{suffix}"

    def constant(suffix: str, dtype: int, dims: list[int], values: list) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name(suffix)], value=helper.make_tensor(name(suffix), dtype, dims, values)
        )

    return [
        constant("axis_last", TensorProto.INT64, [1], [-1]),
        constant("rev_start", TensorProto.INT64, [1], [-1]),
        constant("rev_end", TensorProto.INT64, [1], [-(2**63)]),
        constant("one", TensorProto.INT64, [], [1]),
        helper.make_node(  # reverse the expert axis (step -1)
            "Slice", [probs, name("rev_start"), name("rev_end"), name("axis_last"), name("axis_last")], [name("rev")]
        ),
        helper.make_node("TopK", [name("rev"), k], [top_p, name("r")], axis=-1, largest=1, sorted=1),
        helper.make_node("Shape", [probs], [name("shape")]),
        helper.make_node("Gather", [name("shape"), name("axis_last")], [name("experts")]),
        helper.make_node("Sub", [name("experts"), name("r")], [name("e_plus_1")]),
        helper.make_node("Sub", [name("e_plus_1"), name("one")], [top_e]),
    ]
