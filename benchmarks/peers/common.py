"""Shared pieces of the peer benchmarks: the prompt, the timing arithmetic, peak RSS, subprocess isolation.

Every peer gets the SAME prompt (`random_prompt`) and its timings go through the SAME arithmetic
(`timing_fields`), so the numbers of different stacks differ only by the stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# One prompt generator and one peak-RSS reading for moetrt and every peer (peak_rss_bytes reads VmHWM:
# getrusage's ru_maxrss would include the parent's high-water mark, which Linux carries across exec).
from moetrt.bench.workload import peak_rss_bytes, random_prompt  # noqa: F401  (re-exported to hf, ortgenai, verify)

REPO_ROOT = Path(__file__).resolve().parents[2]

# The fields every `bench_*` function returns (backends may add more, e.g. `backend`, `precision`).
RESULT_FIELDS = (
    "prefill_ms",  # time to first token: from the call until the first new token is on the host
    "decode_tokens_per_s",  # batch * (new_tokens - 1) / (time from first to last new token)
    "decode_ms_per_step",  # (time from first to last new token) / (new_tokens - 1)
    "peak_rss_bytes",  # ru_maxrss of the process that ran the benchmark (load + warmup + timed run)
    "token_ids",  # [batch][new_tokens] greedy ids of the timed run
)


def timing_fields(t_start: float, token_times: list[float], batch: int) -> dict[str, float]:
    """Prefill and decode figures from per-step host timestamps (`time.perf_counter()`).

    `token_times[i]` is when new token i (for all rows) reached the host. Prefill (time to first token)
    is `token_times[0] - t_start`; decode is the N-1 steps after it. Timing one run step by step is more
    honest than subtracting a `max_new_tokens=1` run from a `max_new_tokens=N` run: the two runs'
    prefills differ by noise of the same size as a few decode steps, and the subtraction hides it."""
    n = len(token_times)
    if n < 2:
        raise ValueError("need at least 2 new tokens to time decode")
    decode_s = token_times[-1] - token_times[0]
    steps_ms = sorted(1e3 * (b - a) for a, b in zip(token_times[:-1], token_times[1:], strict=True))
    return {
        "prefill_ms": 1e3 * (token_times[0] - t_start),
        "decode_tokens_per_s": batch * (n - 1) / decode_s,
        "decode_ms_per_step": 1e3 * decode_s / (n - 1),
        # Per-step spread: on a shared machine the fastest steps are the ones nobody else preempted, so
        # p10 tracks the uncontended speed better than the mean does.
        "decode_step_ms_p10": steps_ms[(n - 1) // 10],
        "decode_step_ms_p50": steps_ms[(n - 1) // 2],
    }


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a child that must use `threads` threads in every runtime it loads (OpenMP, MKL,
    OpenBLAS): `torch.set_num_threads` alone does not bind libraries initialised before it."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import importlib
module, func = sys.argv[2].split(":")
result = getattr(importlib.import_module(module), func)(**json.loads(sys.argv[3]))
with open(sys.argv[4], "w") as f:
    json.dump(result, f)
"""


def run_isolated(target: str, kwargs: dict[str, Any], threads: int | None = None, timeout: float = 600) -> dict:
    """Call `target` ("package.module:function", importable from the repo root) with `kwargs` in a fresh
    Python process and return its (JSON-serialisable) result.

    Why: ru_maxrss is a high-water mark per process, so two backends in one process mix their peaks, and
    a backend that loaded first leaves its pages and thread pools behind for the next. Raises
    RuntimeError with the child's output tail when the child fails or times out."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", _CHILD, str(REPO_ROOT), target, json.dumps(kwargs), str(out)]
        env = thread_env(threads) if threads else None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as err:
            tail = (err.stdout or b"")[-2000:] if isinstance(err.stdout, bytes) else (err.stdout or "")[-2000:]
            raise RuntimeError(f"{target} timed out after {timeout:.0f} s; output tail:\n{tail}") from None
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"{target} failed (exit {proc.returncode}); output tail:\n{tail}")
        return json.loads(out.read_text())
