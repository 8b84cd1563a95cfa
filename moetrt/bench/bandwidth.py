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

from moetrt.model.sizes import part_bytes_per_param


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


def decode_bytes_per_token(config: Any, precision: str, context_len: int = 0, batch: int = 1) -> dict[str, float]:
    """Bytes one decode step of `batch` rows reads, by part (and `total`), for a Mixtral-class `config`
    (moetrt `MixtralConfig` or a transformers `MixtralConfig`: same field names) whose weights are stored at
    `precision` (bytes per parameter of each part: `moetrt.model.sizes.part_bytes_per_param`).

        embedding   = B * H                              (one row of the table per token)
        attention   = L * (H*nh*hd + 2*H*nkv*hd + nh*hd*H)   (q, k, v, o projections)
        experts     = L * e(B) * 3*H*F                    (w1, w3, w2 of the experts the step touches)
        router      = L * E*H
        norms       = (2L + 1) * H
        lm_head     = V*H                                 (read in full even when tied to the embedding)
        (each times its part's bytes per parameter)
        kv_cache    = B * 2 * L * nkv*hd * 4 bytes * context_len   (fp32 K and V of the past tokens)

    e(1) = k: a token's top-k experts are distinct. For B > 1 rows, e(B) = E * (1 - (1 - k/E)^B), the
    expected number of distinct experts when each row picks its k uniformly: an estimate (real routing is
    neither uniform nor independent), which is why figures for B > 1 are labelled as such where shown."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    experts, top_k = config.num_local_experts, config.num_experts_per_tok
    touched = top_k if batch == 1 else experts * (1 - (1 - top_k / experts) ** batch)
    per_param = part_bytes_per_param(precision)
    params = {
        "embedding": batch * h,
        "attention": layers * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim),
        "experts": layers * touched * 3 * h * f,
        "router": layers * experts * h,
        "norms": (2 * layers + 1) * h,
        "lm_head": v * h,
    }
    parts = {part: n * per_param[part] for part, n in params.items()}
    parts["kv_cache"] = batch * 2 * layers * kv_heads * head_dim * 4 * context_len
    parts["total"] = sum(parts.values())
    return parts


def bound_tokens_per_s(bandwidth_gbs: float, bytes_per_step: float, batch: int = 1) -> float:
    """The bandwidth cap on decode: `batch` tokens per step, each step reading `bytes_per_step` bytes."""
    return batch * bandwidth_gbs * 1e9 / bytes_per_step


def engine_bytes_per_token(config: Any, precision: str, batch: int = 1, context_len: int = 0) -> dict[str, float]:
    """`decode_bytes_per_token` for a moetrt engine (or the eager model) of `precision`."""
    return decode_bytes_per_token(config, precision, context_len=context_len, batch=batch)
