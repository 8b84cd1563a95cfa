"""Combine: out[t] = D(sum_j topk_weights[t, j] * expert_out[t*k + j]), accumulated in fp32.

Contract: moetrt/plugins/contract.py (output = D(sum_j w_j * y_j), the sum accumulated in fp32). Each program
owns one token and a BLOCK_H slice of the hidden axis and adds the k slots in slot order, so the result is
bit-for-bit reproducible run to run (no atomics anywhere in the op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetrt.plugins.kernels import geometry


@triton.jit(do_not_specialize=["T"])
def combine_kernel(
    expert_out_ptr,  # [T * K, H] D
    topk_weights_ptr,  # [T, K] fp32
    T,  # tokens
    out_ptr,  # [T, H] D
    H: tl.constexpr,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(topk_weights_ptr + token * K + j)
        y = tl.load(expert_out_ptr + (token * K + j) * H + cols, mask=col_ok, other=0.0)
        acc += y.to(tl.float32) * w
    tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def combine(expert_out: Tensor, topk_weights: Tensor, dims: geometry.MoeDims, out: Tensor | None = None) -> Tensor:
    """The op's output [T, H] (written into `out` when given, e.g. a TensorRT output buffer)."""
    t = topk_weights.shape[0]
    if out is None:
        out = torch.empty((t, dims.hidden_size), dtype=expert_out.dtype, device=expert_out.device)
    combine_kernel[geometry.grid(geometry.COMBINE, dims, t)](
        expert_out, topk_weights, t, out, **geometry.constexprs(geometry.COMBINE, dims), **geometry.COMPILE_OPTIONS
    )
    return out


def combine_reference(expert_out: Tensor, topk_weights: Tensor) -> Tensor:
    """The weighted slot sum in fp32, rounded once to the output dtype."""
    t, k = topk_weights.shape
    y = expert_out.reshape(t, k, -1).float() * topk_weights[:, :, None]
    return y.sum(dim=1).to(expert_out.dtype)
