"""`fused_topk_moe`: the whole TopKMoE op (contract: moetrt/plugins/contract.py) as five Triton launches.

It runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before these modules were first
imported (triton chooses interpreter or compiler when a kernel is decorated). Every intermediate buffer has a
size fixed by T and the model's constants (see `geometry`), and nothing reads a routing result on the host,
so the launch sequence can be captured in a CUDA graph. The same kernels, geometry and compile options serve
the TensorRT plugins (moetrt/plugins/trt_moe.py): the JIT plugin calls this function, the AOT plugins embed
the kernels' PTX (moetrt/plugins/ptx.py).
"""

from __future__ import annotations

from torch import Tensor

from moetrt.plugins.kernels import geometry
from moetrt.plugins.kernels.align import align
from moetrt.plugins.kernels.combine import combine
from moetrt.plugins.kernels.expert_gemm import expert_gemm1, expert_gemm2
from moetrt.plugins.kernels.routing import route


def moe_dims(hidden: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int,
             normalize: bool, block_m: int = geometry.BLOCK_M) -> geometry.MoeDims:  # fmt: skip
    """The layer's constants, after checking the contract's shapes, dtypes and layout."""
    t, h = hidden.shape
    e, f, _ = w1.shape
    expected = {"router_weight": (e, h), "w1": (e, f, h), "w3": (e, f, h), "w2": (e, h, f)}
    for name, tensor in {"router_weight": router_weight, "w1": w1, "w3": w3, "w2": w2}.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {expected[name]} for hidden [{t}, {h}]")
        if tensor.dtype != hidden.dtype or tensor.device != hidden.device:
            raise ValueError(f"{name}: {tensor.dtype} on {tensor.device}, expected {hidden.dtype} on {hidden.device}")
    for name, tensor in {"hidden": hidden, "router_weight": router_weight, "w1": w1, "w3": w3, "w2": w2}.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: the kernels index rows by shape, so it must be contiguous")
    return geometry.MoeDims(h, f, e, int(top_k), bool(normalize), block_m)


def fused_topk_moe(
    hidden: Tensor,
    router_weight: Tensor,
    w1: Tensor,
    w3: Tensor,
    w2: Tensor,
    top_k: int,
    normalize: bool = True,
    *,
    block_m: int = geometry.BLOCK_M,
    out: Tensor | None = None,
) -> Tensor:
    """The TopKMoE op: hidden [T, H]; router_weight [E, H]; w1, w3 [E, F, H]; w2 [E, H, F] -> [T, H].

    Same semantics as `moetrt.model.mixtral.sparse_moe` (tie rule included). `out` [T, H] receives the result
    when given (the TensorRT plugin passes its output buffer); `block_m` is the per-expert row padding.
    """
    dims = moe_dims(hidden, router_weight, w1, w3, w2, top_k, normalize, block_m)
    topk_ids, topk_weights = route(hidden, router_weight, dims)
    alignment = align(topk_ids, dims)
    inter = expert_gemm1(hidden, w1, w3, alignment, dims)
    expert_out = expert_gemm2(inter, w2, alignment, hidden.shape[0], dims)
    return combine(expert_out, topk_weights, dims, out=out)
