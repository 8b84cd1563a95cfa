"""The workload and the memory reading every stack in a benchmark shares (numpy only: peers import it too,
and importing torch here would add torch to an ONNX Runtime GenAI process's memory)."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import numpy as np


def random_prompt(vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    """`[batch, prompt_len]` int64 ids drawn uniformly from [3, vocab_size): no <unk>/<s>/</s>, so no stack
    treats a prompt token specially. Seeded numpy PCG64: moetrt and the peers in benchmarks/peers see the
    same ids."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, size=(batch, prompt_len), dtype=np.int64)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space (Linux VmHWM).

    Not getrusage's ru_maxrss: Linux folds the parent's high-water mark into the child's at exec, so a child
    started by a process that had built a 3 GB engine would report at least 3 GB whatever it did."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: ru_maxrss is KiB on Linux-likes, bytes on macOS; the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
