"""The two grouped expert GEMMs over the aligned rows (see `align`).

Contract: moetrt/plugins/contract.py, y_j = w2[e_j] @ (silu(w1[e_j] @ x) * (w3[e_j] @ x)), products in D with
fp32 accumulation. Each GEMM program owns BLOCK_M rows of one expert (`block_expert`) and a BLOCK_N slice of
the output columns, so it reads that expert's weight tile once for up to BLOCK_M tokens. Rounding follows the
eager reference step by step: each projection is rounded to D, silu is evaluated in fp32 and rounded to D,
and so is the gated product. Programs past the real padded row count (offsets[E]) do nothing.

gemm2 writes one row per (token, slot) pair into `expert_out` [T*k, H] (each pair sits in exactly one sorted
row, so no two programs write the same row): no atomics, and the weighted sum over slots is left to
`combine`, which makes the op deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from moetrt.plugins.kernels import geometry
from moetrt.plugins.kernels.align import Alignment


@triton.jit(do_not_specialize=["T"])
def expert_gemm1_kernel(
    hidden_ptr,  # [T, H] D
    w1_ptr,  # [E, F, H] D
    w3_ptr,  # [E, F, H] D
    sorted_ids_ptr,  # [rows_bound] int32
    block_expert_ptr,  # [blocks_bound] int32
    offsets_ptr,  # [E + 1] int32
    T,  # tokens
    inter_ptr,  # [rows_bound, F] D
    H: tl.constexpr,
    F: tl.constexpr,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    if block * BLOCK_M < tl.load(offsets_ptr + E):
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + rows)
        row_ok = pair < T * K
        token = (pair // K).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < F
        w_base = expert * F * H
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            x = tl.load(hidden_ptr + token[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_off = w_base + cols[None, :] * H + ks[:, None]  # [BLOCK_K, BLOCK_N]: w[e, n, k] transposed
            w_ok = k_ok[:, None] & col_ok[None, :]
            gate = tl.dot(x, tl.load(w1_ptr + w_off, mask=w_ok, other=0.0), gate, input_precision="ieee")
            up = tl.dot(x, tl.load(w3_ptr + w_off, mask=w_ok, other=0.0), up, input_precision="ieee")
        dt = inter_ptr.dtype.element_ty
        g = gate.to(dt).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
        inter = (act * up.to(dt).to(tl.float32)).to(dt)
        tl.store(inter_ptr + rows[:, None].to(tl.int64) * F + cols[None, :], inter, mask=col_ok[None, :])


@triton.jit(do_not_specialize=["T"])
def expert_gemm2_kernel(
    inter_ptr,  # [rows_bound, F] D
    w2_ptr,  # [E, H, F] D
    sorted_ids_ptr,  # [rows_bound] int32
    block_expert_ptr,  # [blocks_bound] int32
    offsets_ptr,  # [E + 1] int32
    T,  # tokens
    expert_out_ptr,  # [T * K, H] D
    H: tl.constexpr,
    F: tl.constexpr,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    if block * BLOCK_M < tl.load(offsets_ptr + E):
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + rows)
        row_ok = pair < T * K
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        w_base = expert * H * F
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < F
            a = tl.load(inter_ptr + rows[:, None].to(tl.int64) * F + ks[None, :], mask=k_ok[None, :], other=0.0)
            w = tl.load(w2_ptr + w_base + cols[None, :] * F + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)  # fmt: skip
            acc = tl.dot(a, w, acc, input_precision="ieee")
        out = expert_out_ptr + pair[:, None].to(tl.int64) * H + cols[None, :]
        tl.store(out, acc.to(expert_out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def expert_gemm1(hidden: Tensor, w1: Tensor, w3: Tensor, al: Alignment, dims: geometry.MoeDims) -> Tensor:
    """inter [rows_bound, F] in hidden's dtype; rows past offsets[E] are left unwritten (never read)."""
    t = hidden.shape[0]
    inter = torch.empty((al.sorted_ids.shape[0], dims.intermediate_size), dtype=hidden.dtype, device=hidden.device)
    expert_gemm1_kernel[geometry.grid(geometry.GEMM1, dims, t)](
        hidden, w1, w3, al.sorted_ids, al.block_expert, al.offsets, t, inter,
        **geometry.constexprs(geometry.GEMM1, dims), **geometry.COMPILE_OPTIONS,
    )  # fmt: skip
    return inter


def expert_gemm2(inter: Tensor, w2: Tensor, al: Alignment, num_tokens: int, dims: geometry.MoeDims) -> Tensor:
    """expert_out [T*k, H] in inter's dtype: row t*k + j is token t's slot-j expert output, unweighted."""
    out = torch.empty((num_tokens * dims.top_k, dims.hidden_size), dtype=inter.dtype, device=inter.device)
    expert_gemm2_kernel[geometry.grid(geometry.GEMM2, dims, num_tokens)](
        inter, w2, al.sorted_ids, al.block_expert, al.offsets, num_tokens, out,
        **geometry.constexprs(geometry.GEMM2, dims), **geometry.COMPILE_OPTIONS,
    )  # fmt: skip
    return out


def _blocks(al: Alignment, num_pairs: int, block_m: int):
    """(expert, rows, pairs) of every used block, rows and pairs restricted to real (non-sentinel) rows."""
    for block, expert in enumerate(al.block_expert.tolist()):
        if expert < 0:
            continue
        rows = torch.arange(block * block_m, (block + 1) * block_m)
        pairs = al.sorted_ids[rows].long()
        keep = pairs < num_pairs
        yield expert, rows[keep], pairs[keep]


def expert_gemm1_reference(hidden: Tensor, w1: Tensor, w3: Tensor, al: Alignment, dims: geometry.MoeDims) -> Tensor:
    """inter for rows < offsets[E] (zeros elsewhere, padding rows included), computed as the eager reference."""
    al = Alignment(*(x.cpu() for x in al))
    inter = torch.zeros((al.sorted_ids.shape[0], dims.intermediate_size), dtype=hidden.dtype)
    for expert, rows, pairs in _blocks(al, hidden.shape[0] * dims.top_k, dims.block_m):
        x = hidden[pairs // dims.top_k]
        inter[rows] = F.silu(x @ w1[expert].t()) * (x @ w3[expert].t())
    return inter


def expert_gemm2_reference(inter: Tensor, w2: Tensor, al: Alignment, num_tokens: int, dims: geometry.MoeDims) -> Tensor:
    """expert_out [T*k, H] computed as the eager reference's down projection."""
    al = Alignment(*(x.cpu() for x in al))
    out = torch.zeros((num_tokens * dims.top_k, dims.hidden_size), dtype=inter.dtype)
    for expert, rows, pairs in _blocks(al, num_tokens * dims.top_k, dims.block_m):
        out[pairs] = inter[rows] @ w2[expert].t()
    return out
