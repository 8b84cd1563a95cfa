"""Peer: Hugging Face transformers `MixtralForCausalLM.generate` (greedy, fp32, CPU).

This is the baseline most users would run, so moetrt's speed-ups are reported against it. Options:
attention `eager` or `sdpa`; KV cache `dynamic` (generate's default `DynamicCache`) or `static`
(`cache_implementation="static"`; on CPU transformers does not auto-compile it, so it is eager too);
experts `None` = transformers' default (transformers 5 picks `grouped_mm`, torch's grouped GEMM, when
torch supports it on the device: torch > 2.10 on CPU) or `"eager"` (its per-expert Python loop). The
result records the experts implementation actually used.

Timing: one `generate` call with a streamer that stamps `time.perf_counter()` each time a new token
reaches it (transformers calls `streamer.put` right after each argmax on CPU). See `common.timing_fields`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.peers.common import peak_rss_bytes, random_prompt, timing_fields

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
CACHES = ("dynamic", "static")


class _StampStreamer:
    """A `transformers` streamer (duck-typed `BaseStreamer`) that records when each new token arrives.

    `generate` first puts the whole prompt, then one `[batch]` tensor per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._saw_prompt = False

    def put(self, value: Any) -> None:
        now = time.perf_counter()
        if not self._saw_prompt:
            self._saw_prompt = True
            return
        self.times.append(now)

    def end(self) -> None:
        pass


def load_hf_model(checkpoint_dir: str | Path, attn: str = "eager", experts: str | None = None) -> Any:
    """Load the checkpoint in fp32 on CPU with the given attention (and experts) implementation, eval mode."""
    import torch
    from transformers import MixtralForCausalLM

    if attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn must be one of {ATTN_IMPLEMENTATIONS}, got {attn!r}")
    extra = {} if experts is None else {"experts_implementation": experts}
    model = MixtralForCausalLM.from_pretrained(
        str(checkpoint_dir), dtype=torch.float32, attn_implementation=attn, **extra
    )
    return model.eval()


def hf_generate(model: Any, prompt: Any, new_tokens: int, cache: str = "dynamic") -> tuple[list[float], Any]:
    """One greedy `generate` of exactly `new_tokens` tokens (min_new_tokens = max_new_tokens, so EOS cannot
    end a run early). Returns (per-token host timestamps, generated ids [batch, new_tokens])."""
    import torch

    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    ids = torch.as_tensor(prompt, dtype=torch.long)
    streamer = _StampStreamer()
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
            streamer=streamer,
            disable_compile=True,
            **extra,
        )
    return streamer.times, out[:, ids.shape[1] :]


def bench_hf(
    checkpoint_dir: str,
    prompt_len: int = 128,
    new_tokens: int = 128,
    batch: int = 1,
    threads: int = 2,
    attn: str = "eager",
    cache: str = "dynamic",
    experts: str | None = None,
    seed: int = 0,
    warmup_tokens: int = 16,
) -> dict[str, Any]:
    """Benchmark HF `generate` on `checkpoint_dir` (fp32, `torch.set_num_threads(threads)`).

    A warmup `generate` on the same prompt with `warmup_tokens` new tokens (0: none) comes first: it
    runs a full-length prefill and a few decode steps, which is what faults in the weights and starts
    the thread pools and allocator; then the timed run. Run it in its own process
    (`common.run_isolated`) for a meaningful `peak_rss_bytes`."""
    import torch

    torch.set_num_threads(threads)
    t_load = time.perf_counter()
    model = load_hf_model(checkpoint_dir, attn, experts)
    load_s = time.perf_counter() - t_load
    prompt = random_prompt(model.config.vocab_size, batch, prompt_len, seed)
    if warmup_tokens:
        hf_generate(model, prompt, max(2, min(warmup_tokens, new_tokens)), cache)
    t0 = time.perf_counter()
    times, gen = hf_generate(model, prompt, new_tokens, cache)
    wall_s = time.perf_counter() - t0
    if len(times) != new_tokens:
        raise RuntimeError(f"streamer saw {len(times)} new tokens, expected {new_tokens}")
    return {
        "backend": f"hf-{attn}-{cache}" + {None: "", "eager": "-loop"}.get(experts, f"-{experts}"),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "precision": "fp32",
        **timing_fields(t0, times, batch),
        "wall_s": wall_s,
        "load_s": load_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "token_ids": gen.tolist(),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch": batch,
        "threads": threads,
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
    }
