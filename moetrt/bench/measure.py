"""One backend measured by the process that calls `measure`: load, warm up, one timed greedy generation.

Run it in a process of its own (moetrt.bench.isolate): peak memory is a per-process high-water mark, and a
backend loaded earlier in the same process would leave its pages and thread pools behind for the next.

Figures come from the generation loop every backend shares (moetrt.runtime.generate), so the backends
differ only by their `step`:
    prefill_ms            the prefill step alone
    ttft_ms               time to first token: input preparation, prefill, sampling of token 0
    decode_tokens_per_s   tokens of the decode steps (token 0 excluded) / time of the decode steps
Exactly `new_tokens` tokens are generated (no stop token ends a row early).
"""

from __future__ import annotations

import time
from typing import Any

from moetrt.bench.prepare import bench_backends
from moetrt.bench.workload import peak_rss_bytes, random_prompt
from moetrt.runtime.engine import load_backend
from moetrt.runtime.generate import generate


def measure(
    path: str,
    backend: str,
    prompt_len: int,
    new_tokens: int,
    batch: int = 1,
    threads: int | None = None,
    seed: int = 0,
    warmup_tokens: int = 16,
    max_seq_len: int | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Measure the engine (or, for backend "eager", the checkpoint, in `dtype`: default the checkpoint's) in
    `path`; a JSON-ready result.

    max_seq_len: the eager backend's KV capacity (default prompt_len + new_tokens); an engine's is fixed by
    its export.

    The warmup is a generation on the same prompt with min(warmup_tokens, new_tokens) tokens: a full-length
    prefill and some decode steps, which fault in the weights and start thread pools and allocators."""
    engine = bench_backends()[backend]
    on_gpu = engine is not None and engine[0].accelerator == "cuda"
    torch = None
    if engine is None or on_gpu:  # a CPU engine runs without torch in the process (its peak RSS too)
        import torch

        if threads is not None:
            torch.set_num_threads(threads)  # the eager model; ORT engines carry their thread count
    gpu = on_gpu and torch.cuda.is_available()
    free_before = torch.cuda.mem_get_info()[0] if gpu else 0
    t0 = time.perf_counter()
    options = {"max_seq_len": max_seq_len or prompt_len + new_tokens, "dtype": dtype} if engine is None else {}
    runner = load_backend(path, max_batch=batch, **options)
    load_s = time.perf_counter() - t0
    try:
        prompts = random_prompt(runner.config.vocab_size, batch, prompt_len, seed).tolist()
        if warmup_tokens:
            generate(runner, prompts, max(2, min(warmup_tokens, new_tokens)), stop_token_ids=())
        result = generate(runner, prompts, new_tokens, stop_token_ids=())
        gpu_mem = free_before - torch.cuda.mem_get_info()[0] if gpu else None
        huge_pages = getattr(runner, "huge_pages", None)
    finally:
        runner.close()
    return {
        "backend": backend,
        "prefill_ms": result.prefill_ms,
        "ttft_ms": result.ttft_ms,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "decode_ms_per_step": result.decode_ms / max(result.decode_steps, 1),
        "peak_rss_bytes": peak_rss_bytes(),
        "huge_page_bytes": huge_pages.collapsed if huge_pages is not None else None,
        "gpu_mem_bytes": gpu_mem,
        "load_s": load_s,
        "token_ids": result.tokens,
    }
