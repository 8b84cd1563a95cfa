"""The `moetrt::topk_moe` torch custom op: how one MoE block becomes one ONNX node.

Passed to `Mixtral(config, moe_fn=topk_moe)`, it keeps the eager math (`sparse_moe`) while torch.export
sees an opaque op; `onnx_translation` then emits exactly one `moetrt::TopKMoE` node per layer with the
contract's inputs and attributes (moetrt/plugins/contract.py), instead of the data-dependent loop over
experts that `sparse_moe` traces to.
"""

from __future__ import annotations

import torch
from onnxscript.values import Opset

from moetrt.model.mixtral import sparse_moe
from moetrt.plugins import contract

OP_NAME = "moetrt::topk_moe"


@torch.library.custom_op(OP_NAME, mutates_args=())
def topk_moe(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    normalize: bool,
) -> torch.Tensor:
    """Eager implementation: the reference `sparse_moe` (a custom op must not return an input alias)."""
    return sparse_moe(hidden, router_weight, w1, w3, w2, top_k, normalize)


@topk_moe.register_fake
def _topk_moe_fake(hidden, router_weight, w1, w3, w2, top_k, normalize):
    """The contract's output shape is static ([T, H] like `hidden`), so tracing needs no data."""
    return torch.empty_like(hidden)


_MOETRT = Opset(contract.DOMAIN, 1)


def onnx_translation(hidden, router_weight, w1, w3, w2, top_k: int, normalize: bool):
    """torch.onnx `custom_translation_table` entry: one TopKMoE node (needs `contract.register_onnx_schema()`)."""
    return _MOETRT.TopKMoE(hidden, router_weight, w1, w3, w2, **contract.node_attributes(top_k, normalize))
