"""Memory checks made BEFORE a large allocation: a request the machine cannot hold is refused with one line
that says how much was needed and how much there is, instead of an allocation failure deep in numpy or
torch (or the kernel's OOM killer) after minutes of work.

The bound is the memory available now (`psutil.virtual_memory().available`: free plus reclaimable page
cache), so a request that fits only by swapping is refused too.
"""

from __future__ import annotations

import psutil

from moetrt.errors import MoetrtError


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units up to PiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def require_memory(nbytes: int, what: str) -> None:
    """Raise a one-line MoetrtError when `nbytes` (for `what`, e.g. "KV cache of 4 rows x 4096 tokens")
    exceed the memory available on this machine."""
    available = psutil.virtual_memory().available
    if nbytes > available:
        raise MoetrtError(
            f"{what}: needs {human_bytes(nbytes)}, this machine has {human_bytes(available)} of memory available"
        )


def kv_cache_bytes(layers: int, rows: int, kv_heads: int, max_seq_len: int, head_dim: int, itemsize: int) -> int:
    """Bytes of static K and V buffers [rows, kv_heads, max_seq_len, head_dim] for every layer."""
    return 2 * layers * rows * kv_heads * max_seq_len * head_dim * itemsize
