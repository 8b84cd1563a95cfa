"""The memory-bandwidth bound on decode: measured read bandwidth / bytes a decode step must read.

At batch 1 a decode step reads every weight it uses once and does ~2 flops per weight, far below what
the cores can do, so tokens/s is capped by how fast the weights stream from DRAM. `bound_tokens_per_s`
is that cap; a backend's decode tok/s divided by it is its bandwidth efficiency, which compares across
machines better than raw tok/s (and shows how much headroom is left).

This is the one implementation: `moetrt bench`, benchmarks/run_all.py and the peer baselines in
benchmarks/peers all use it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


def read_bandwidth_gbs(threads: int = 1, size_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """Best-of-`repeats` read bandwidth (GB/s, 1e9 bytes) of summing a `size_bytes` float32 array.

    One thread: `ndarray.sum()`. N threads: the array split into N contiguous parts, each summed by
    `ndarray.sum()` in its own Python thread; numpy releases the GIL inside the reduction loop (checked:
    2 threads on a 2-core machine are faster than 1), so the parts run in parallel. Also measures
    `torch.sum` with `torch.set_num_threads(threads)` when torch is installed; `gbs` is the better of the
    two, since the bound is what the memory system can deliver, not what one library achieves.
    The array (default 1 GiB) is far larger than any cache, and is touched once before timing."""
    a = np.ones(size_bytes // 4, dtype=np.float32)  # np.ones writes every page: no first-touch in timings
    parts = np.array_split(a, threads)

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return a.nbytes / min(times) / 1e9

    if threads == 1:
        numpy_gbs = best(a.sum)
    else:
        with ThreadPoolExecutor(threads) as pool:
            numpy_gbs = best(lambda: list(pool.map(np.sum, parts)))
    result: dict[str, Any] = {"threads": threads, "size_bytes": a.nbytes, "repeats": repeats, "numpy_gbs": numpy_gbs}
    try:
        import torch
    except ImportError:
        result["gbs"] = numpy_gbs
        return result
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.from_numpy(a)
        result["torch_gbs"] = best(t.sum)
    finally:
        torch.set_num_threads(saved)
    result["gbs"] = max(numpy_gbs, result["torch_gbs"])
    return result


def decode_bytes_per_token(
    config: Any,
    bytes_per_param: float,
    router_bytes_per_param: float | None = None,
    context_len: int = 0,
    expert_bytes_per_param: float | None = None,
    batch: int = 1,
) -> dict[str, float]:
    """Bytes one decode step of `batch` rows reads, by part (and `total`), for a Mixtral-class `config`
    (moetrt `MixtralConfig` or a transformers `MixtralConfig`: same field names).

        embedding   = B * H                              (one row of the table per token)
        attention   = L * (H*nh*hd + 2*H*nkv*hd + nh*hd*H)   (q, k, v, o projections)
        experts     = L * e(B) * 3*H*F                    (w1, w3, w2 of the experts the step touches)
        router      = L * E*H
        norms       = (2L + 1) * H
        lm_head     = V*H                                 (read in full even when tied to the embedding)
        (times bytes_per_param; experts times expert_bytes_per_param and router times
        router_bytes_per_param, both defaulting to bytes_per_param)
        kv_cache    = B * 2 * L * nkv*hd * 4 bytes * context_len   (fp32 K and V of the past tokens)

    e(1) = k: a token's top-k experts are distinct. For B > 1 rows, e(B) = E * (1 - (1 - k/E)^B), the
    expected number of distinct experts when each row picks its k uniformly: an estimate (real routing is
    neither uniform nor independent), which is why figures for B > 1 are labelled as such where shown.
    Quantized weights: pass the effective bytes including scales, e.g. block-32 int8 with fp32 scales
    1 + 4/32 = 1.125, int4 0.5 + 4/32 = 0.625."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    experts, top_k = config.num_local_experts, config.num_experts_per_tok
    rb = bytes_per_param if router_bytes_per_param is None else router_bytes_per_param
    eb = bytes_per_param if expert_bytes_per_param is None else expert_bytes_per_param
    touched = top_k if batch == 1 else experts * (1 - (1 - top_k / experts) ** batch)
    parts = {
        "embedding": batch * h * bytes_per_param,
        "attention": layers * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim) * bytes_per_param,
        "experts": layers * touched * 3 * h * f * eb,
        "router": layers * experts * h * rb,
        "norms": (2 * layers + 1) * h * bytes_per_param,
        "lm_head": v * h * bytes_per_param,
        "kv_cache": batch * 2 * layers * kv_heads * head_dim * 4 * context_len,
    }
    parts["total"] = sum(parts.values())
    return parts


def bound_tokens_per_s(bandwidth_gbs: float, bytes_per_step: float, batch: int = 1) -> float:
    """The bandwidth cap on decode: `batch` tokens per step, each step reading `bytes_per_step` bytes."""
    return batch * bandwidth_gbs * 1e9 / bytes_per_step


# Effective bytes per weight incl. block-32 fp32 scales.
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}


def engine_bytes_per_token(config: Any, precision: str, batch: int = 1, context_len: int = 0) -> dict[str, float]:
    """`decode_bytes_per_token` for a moetrt engine (or the eager model) of `precision`: every weight at that
    width, except that int8 / int4 engines keep the routers float32 (QMoE experts and MatMulNBits attention
    and lm_head: moetrt/engines/ort_lowering.py, ort_linear.py). ORT GenAI's builder quantizes the same set."""
    router = BYTES_PER_PARAM["fp32"] if precision in ("int8", "int4") else None
    return decode_bytes_per_token(config, BYTES_PER_PARAM[precision], router, context_len=context_len, batch=batch)
