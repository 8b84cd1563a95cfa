"""Triton kernels for the `moetrt::TopKMoE` op (contract: moetrt/plugins/contract.py), the fused MoE forward
that vLLM and TensorRT-LLM use, as five kernels with static buffer bounds and no host synchronisation:

    route    hidden [T, H], router_weight [E, H] -> topk_ids [T, k] int32, topk_weights [T, k] fp32
    align    topk_ids -> per-expert counts, padded offsets, sorted pair ids, per-block expert ids
    gemm1    silu(x w1[e]^T) * (x w3[e]^T) for each block of one expert's rows -> inter [rows_bound, F]
    gemm2    inter w2[e]^T -> expert_out [T*k, H], one row per (token, slot) pair, no atomics
    combine  out[t] = sum_j topk_weights[t, j] * expert_out[t*k + j], in fp32, in slot order

`geometry` (no triton import) holds the block sizes, buffer bounds and grids shared by the Python launchers
and the TensorRT AOT plugins. The kernel modules import triton at top level, so nothing on moetrt's
CPU-only default path imports them eagerly: `moetrt.plugins.kernels.fused.fused_topk_moe` is the entry point.
"""
