"""The `moetrt::TopKMoE` op contract, written once. Every implementation cites this module:
the eager reference (`moetrt.model.mixtral.sparse_moe`), the exporter's ONNX node, the ONNX Runtime
lowering (`com.microsoft::MoE` / `QMoE`), the Triton kernels and the TensorRT plugin.

Node
    domain `moetrt`, op_type `TopKMoE`, one node per decoder layer holding the whole MoE block.

Inputs (in this order)
    hidden         [T, H]     activations (T = batch * seq, flattened), dtype D (the model dtype)
    router_weight  [E, H]     router (`gate`) weight, dtype D
    w1             [E, F, H]  gate projections, dtype D
    w3             [E, F, H]  up projections, dtype D
    w2             [E, H, F]  down projections, dtype D
    router_weight, w1, w3, w2 are graph initializers.

Output
    output         [T, H]     dtype D; static shape (the same as `hidden`), never data-dependent.

Attributes
    top_k             int  1 <= top_k <= E: experts per token
    normalize         int  1: renormalise the top-k weights to sum to 1 (Mixtral); 0: use the softmax values
    plugin_namespace  str  "moetrt": the TensorRT plugin namespace (the TensorRT ONNX parser ignores the
                           domain and looks the plugin up by op_type, `plugin_version`, `plugin_namespace`)
    plugin_version    str  "1"

Semantics, for each row x of `hidden`
    logits  = x @ router_weight^T                          (in D)
    p       = softmax(float32(logits)) over all E experts   (fp32)
    (e_1..e_k, p_1..p_k) = the k largest p, in descending order; TIE RULE: among exactly equal
              probabilities the HIGHER expert index comes first (descending order of the pairs (p, e)).
              Why this rule: ONNX Runtime's CPU MoE / QMoE kernels order (probability, index) pairs with
              std::greater and cannot be told otherwise, and no rule matches transformers'
              MixtralForCausalLM, whose torch.topk breaks CPU ties in no documented order (torch 2.13:
              topk(zeros(4), 2) -> [2, 3], topk(zeros(8), 2) -> [6, 5]). Exact ties need equal router
              logits (a zeroed or duplicated router row); validation reports how many tokens had one.
              Reference: `moetrt.model.mixtral.route`; ONNX Runtime follows the rule except fp32 engines whose
              experts are sliced for threads (moetrt/engines/ort_lowering.py), where experts tied exactly
              at the k-th place may each contribute a slice - the validation suite's layers check names it.
    w_j     = p_j / sum(p_1..p_k) if normalize else p_j     (fp32)
    y_j     = w2[e_j] @ (silu(w1[e_j] @ x) * (w3[e_j] @ x))  (products in D, fp32 accumulation allowed)
    output  = D(sum_j w_j * y_j), the sum accumulated in fp32.

Version
    CONTRACT_VERSION is recorded in every artifact manifest; bump it when anything above changes
    (2: ties to the higher expert index, was the lower).
"""

from __future__ import annotations

from typing import Any

DOMAIN = "moetrt"
OP_TYPE = "TopKMoE"
CONTRACT_VERSION = 2
INPUTS = ("hidden", "router_weight", "w1", "w3", "w2")
OUTPUTS = ("output",)
PLUGIN_NAMESPACE = "moetrt"
PLUGIN_VERSION = "1"
ATTRIBUTE_TYPES: dict[str, type] = {"top_k": int, "normalize": int, "plugin_namespace": str, "plugin_version": str}


def node_attributes(top_k: int, normalize: bool = True) -> dict[str, Any]:
    """The exact attribute set of a TopKMoE node (and of the TensorRT plugin's fields)."""
    return {
        "top_k": int(top_k),
        "normalize": int(bool(normalize)),
        "plugin_namespace": PLUGIN_NAMESPACE,
        "plugin_version": PLUGIN_VERSION,
    }


def register_onnx_schema() -> None:
    """Register the op's schema with `onnx.defs` so onnxscript, the checker and shape inference know it.

    Idempotent. Shape inference propagates `hidden`'s type and shape to `output`.
    """
    import onnx
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN):
        return
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        1,
        doc=__doc__,
        inputs=[defs.OpSchema.FormalParameter(name, "T") for name in INPUTS],
        outputs=[defs.OpSchema.FormalParameter(OUTPUTS[0], "T")],
        type_constraints=[("T", types, "the model dtype")],
        attributes=[
            defs.OpSchema.Attribute("top_k", defs.OpSchema.AttrType.INT, "experts per token"),
            defs.OpSchema.Attribute("normalize", defs.OpSchema.AttrType.INT, "renormalise top-k weights"),
            defs.OpSchema.Attribute("plugin_namespace", defs.OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
            defs.OpSchema.Attribute("plugin_version", defs.OpSchema.AttrType.STRING, "TensorRT plugin version"),
        ],
    )
    onnx.defs.register_schema(schema)
