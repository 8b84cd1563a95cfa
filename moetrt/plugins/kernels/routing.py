"""Routing: router GEMM, fp32 softmax, top-k with the contract's tie rule, optional renormalisation.

Contract: moetrt/plugins/contract.py (Semantics: logits in D, softmax in fp32, the k largest in descending
order with ties to the higher expert index, weights renormalised to sum 1 when `normalize`); the reference is
`moetrt.model.mixtral.route`.

The router GEMM is fused into the kernel: E is small (8 for Mixtral), so a program reads its BLOCK_T rows of
`hidden` once and the whole router weight (L2-resident) and never writes the logits. Logits are rounded to
D before the softmax, as the eager reference computes them in D.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetrt.plugins.kernels import geometry


@triton.jit(do_not_specialize=["T"])
def route_kernel(
    hidden_ptr,  # [T, H] D
    router_ptr,  # [E, H] D
    T,  # tokens
    topk_ids_ptr,  # [T, K] int32
    topk_weights_ptr,  # [T, K] fp32
    H: tl.constexpr,
    E: tl.constexpr,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    acc = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        x = tl.load(hidden_ptr + rows[:, None] * H + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(router_ptr + experts[None, :] * H + cols[:, None], mask=col_ok[:, None] & expert_ok[None, :],
                    other=0.0)  # fmt: skip
        acc = tl.dot(x, w, acc, input_precision="ieee")
    logits = acc.to(hidden_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(expert_ok[None, :], p, -1.0)  # padded lanes never win (real probabilities are >= 0)

    slots = tl.arange(0, K_PAD)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    vals = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(p, axis=1)
        # Tie rule: among equal probabilities the highest expert index is taken first.
        pick = tl.max(tl.where(p == best[:, None], experts[None, :], -1), axis=1)
        ids = tl.where(slots[None, :] == j, pick[:, None], ids)
        vals = tl.where(slots[None, :] == j, best[:, None], vals)
        p = tl.where(experts[None, :] == pick[:, None], -2.0, p)
    if NORMALIZE:
        vals = vals / tl.sum(vals, axis=1)[:, None]
    out = rows[:, None] * K + slots[None, :]
    ok = row_ok[:, None] & (slots[None, :] < K)
    tl.store(topk_ids_ptr + out, ids, mask=ok)
    tl.store(topk_weights_ptr + out, vals, mask=ok)


def route(hidden: Tensor, router_weight: Tensor, dims: geometry.MoeDims) -> tuple[Tensor, Tensor]:
    """topk_ids [T, k] int32 and topk_weights [T, k] fp32 for `hidden` [T, H] (contiguous, on one device)."""
    t = hidden.shape[0]
    ids = torch.empty((t, dims.top_k), dtype=torch.int32, device=hidden.device)
    weights = torch.empty((t, dims.top_k), dtype=torch.float32, device=hidden.device)
    route_kernel[geometry.grid(geometry.ROUTE, dims, t)](
        hidden, router_weight, t, ids, weights, **geometry.constexprs(geometry.ROUTE, dims), **geometry.COMPILE_OPTIONS
    )
    return ids, weights
