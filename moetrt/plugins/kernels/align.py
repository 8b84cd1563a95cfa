"""Alignment: group the T*k (token, slot) pairs by expert into BLOCK_M-padded runs for the grouped GEMMs.

Contract: moetrt/plugins/contract.py (this kernel only reorders the routing result; it computes nothing the
contract defines). Buffers and their static bounds (see `geometry`; T = tokens, P = T*k pairs):
    counts        [E]            pairs routed to each expert
    offsets       [E + 1]        offsets[e] = first padded row of expert e (exclusive prefix sum of the counts
                                 rounded up to BLOCK_M); offsets[E] = total padded rows (read by the GEMMs)
    sorted_ids    [rows_bound]   row r of expert e's run holds a pair index p (token p // k); rows past an
                                 expert's count and past offsets[E] hold the sentinel P
    block_expert  [blocks_bound] expert of each BLOCK_M block of rows; -1 for blocks past offsets[E]
Within an expert's run the pairs keep ascending pair order (a stable grouping), so the result is a pure
function of topk_ids. One program does it all (counts, scan, scatter): no atomics, no inter-program
synchronisation, no host synchronisation, and a grid that does not depend on the routing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetrt.plugins.kernels import geometry


@triton.jit(do_not_specialize=["T"])
def align_kernel(
    topk_ids_ptr,  # [T * K] int32
    T,  # tokens
    counts_ptr,  # [E] int32
    offsets_ptr,  # [E + 1] int32
    sorted_ids_ptr,  # [T*K + E*(BLOCK_M - 1)] int32
    block_expert_ptr,  # [cdiv(T*K + E*(BLOCK_M - 1), BLOCK_M)] int32
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pairs = T * K
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    lanes = tl.arange(0, CHUNK)

    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, pairs, CHUNK):
        ids = tl.load(topk_ids_ptr + start + lanes, mask=start + lanes < pairs, other=E_PAD)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(counts_ptr + experts, counts, mask=expert_ok)
    tl.store(offsets_ptr + experts, starts, mask=expert_ok)
    tl.store(offsets_ptr + E, total)

    # Scatter: a pair's row = its expert's start + pairs of that expert before it (earlier chunks + this one).
    seen = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, pairs, CHUNK):
        idx = start + lanes
        ids = tl.load(topk_ids_ptr + idx, mask=idx < pairs, other=E_PAD)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot
        row = tl.sum(onehot * (before + seen[None, :] + starts[None, :]), axis=1)
        tl.store(sorted_ids_ptr + row, idx, mask=idx < pairs)
        seen += tl.sum(onehot, axis=0)

    # Sentinels: each expert's padding rows (fewer than BLOCK_M), then every row past the total.
    pad = tl.arange(0, BLOCK_M)
    pad_rows = (starts + counts)[:, None] + pad[None, :]
    pad_ok = expert_ok[:, None] & (pad[None, :] < (padded - counts)[:, None])
    tl.store(sorted_ids_ptr + pad_rows, tl.zeros([E_PAD, BLOCK_M], dtype=tl.int32) + pairs, mask=pad_ok)
    rows = pairs + E * (BLOCK_M - 1)
    for start in range(0, rows, CHUNK):
        r = start + lanes
        tl.store(sorted_ids_ptr + r, tl.zeros([CHUNK], dtype=tl.int32) + pairs, mask=(r >= total) & (r < rows))

    # Block -> expert: the number of experts whose padded run ends at or before the block's first row.
    blocks = (rows + BLOCK_M - 1) // BLOCK_M
    for start in range(0, blocks, CHUNK):
        b = start + lanes
        first = b * BLOCK_M
        owner = tl.sum(((ends[None, :] <= first[:, None]) & expert_ok[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(first < total, owner, -1), mask=b < blocks)


class Alignment(NamedTuple):
    counts: Tensor  # [E] int32
    offsets: Tensor  # [E + 1] int32
    sorted_ids: Tensor  # [rows_bound] int32
    block_expert: Tensor  # [blocks_bound] int32


def align(topk_ids: Tensor, dims: geometry.MoeDims) -> Alignment:
    """Group the pairs of `topk_ids` [T, k] by expert into buffers of the static sizes in the module docstring."""
    t, dev = topk_ids.shape[0], topk_ids.device
    out = Alignment(
        torch.empty(dims.num_experts, dtype=torch.int32, device=dev),
        torch.empty(dims.num_experts + 1, dtype=torch.int32, device=dev),
        torch.empty(geometry.rows_bound(t, dims), dtype=torch.int32, device=dev),
        torch.empty(geometry.blocks_bound(t, dims), dtype=torch.int32, device=dev),
    )
    align_kernel[geometry.grid(geometry.ALIGN, dims, t)](
        topk_ids, t, *out, **geometry.constexprs(geometry.ALIGN, dims), **geometry.COMPILE_OPTIONS
    )
    return out


def align_reference(topk_ids: Tensor, dims: geometry.MoeDims) -> Alignment:
    """The same buffers computed with torch ops on the CPU (a stable sort of the pairs by expert)."""
    t, e, bm = topk_ids.shape[0], dims.num_experts, dims.block_m
    flat = topk_ids.reshape(-1).long().cpu()
    pairs = flat.numel()
    counts = torch.bincount(flat, minlength=e)
    padded = (counts + bm - 1) // bm * bm
    offsets = torch.zeros(e + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(padded, 0)
    sorted_ids = torch.full((geometry.rows_bound(t, dims),), pairs, dtype=torch.long)
    block_expert = torch.full((geometry.blocks_bound(t, dims),), -1, dtype=torch.long)
    order = torch.sort(flat, stable=True).indices
    first = 0
    for expert in range(e):
        n = int(counts[expert])
        start = int(offsets[expert])
        sorted_ids[start : start + n] = order[first : first + n]
        block_expert[start // bm : (start + int(padded[expert])) // bm] = expert
        first += n
    return Alignment(*(x.to(torch.int32) for x in (counts, offsets, sorted_ids, block_expert)))
