"""`--plot OUT.png`: decode tokens/s per backend against its bandwidth bound, and time to first token.

matplotlib is imported here only (it is in the `dev` extra, not a runtime dependency).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError


def plot(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Two bar charts (decode tok/s with the bound as a tick above each bar; TTFT ms), grouped by batch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoetrtError("--plot needs matplotlib: pip install matplotlib (or moetrt[dev])") from None
    labels = [f"{r['backend']}\nb{r['batch']}" for r in rows]
    x = range(len(rows))
    fig, (decode, ttft) = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(rows) + 2), 7), sharex=True)
    decode.bar(x, [r["decode_tokens_per_s"] for r in rows], color="tab:blue", label="decode tok/s")
    bounds = [(i, r["bound_tokens_per_s"]) for i, r in enumerate(rows) if r.get("bound_tokens_per_s")]
    if bounds:
        decode.scatter(*zip(*bounds, strict=True), marker="_", s=600, color="black", label="bandwidth bound")
    decode.set_ylabel("decode tokens/s")
    decode.legend(loc="upper left")
    decode.set_title(textwrap.fill(title, 90), fontsize=9)
    ttft.bar(x, [r["ttft_ms"] for r in rows], color="tab:orange")
    ttft.set_ylabel("time to first token, ms")
    ttft.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
