"""`moetrt routes --plot OUT.png`: heatmaps of each expert's share of a layer's routed tokens (layer x expert),
for prompt and generated tokens, and with `--compare` the change in share (second engine - first).

matplotlib (Agg backend) is imported here only; it is in the `dev` extra, not a runtime dependency.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.routes.report import PARTS, RoutesReport

ANNOTATE_MAX_EXPERTS = 16  # write the percentages into the cells up to this many experts


def plot(report: RoutesReport, path: str | Path) -> Path:
    """Write the heatmaps to `path` (PNG) atomically; returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoetrtError("--plot needs matplotlib: pip install matplotlib (or moetrt[dev])") from None
    panels = [(part, report.layers[part]) for part in PARTS if report.layers[part][0].tokens]
    if not panels:
        raise MoetrtError("--plot: no routed tokens to draw")
    maps = []
    for part, layers in panels:
        labels = [f"{i}  bal {s.balancedness:.2f}" for i, s in enumerate(layers)]
        maps.append((f"{part} tokens ({layers[0].tokens}): share of expert", np.array([s.shares for s in layers]),
                     labels, "viridis"))  # fmt: skip
    if report.compare is not None:
        delta = np.array([c.share_delta for c in report.compare.layers])
        labels = [f"{i}  agree {c.set_agreement:.0%}" for i, c in enumerate(report.compare.layers)]
        maps.append(("share change vs --compare engine", delta, labels, "RdBu_r"))
    num_layers, num_experts = maps[0][1].shape
    share_max = max(float(values.max()) for _, values, _, cmap in maps if cmap == "viridis")  # one scale for both
    width = 1.2 + 0.55 * num_experts
    fig, axes = plt.subplots(1, len(maps), figsize=(width * len(maps) + 1.5, 1.2 + 0.4 * num_layers), squeeze=False)
    for ax, (title, values, labels, cmap) in zip(axes[0], maps, strict=True):
        delta = cmap == "RdBu_r"
        limit = (float(np.abs(values).max()) or 1.0) if delta else share_max
        image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=-limit if delta else 0.0, vmax=limit)
        ax.set_title(textwrap.fill(title, 40), fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_layers), labels, fontsize=7)
        ax.set_ylabel("layer")
        if num_experts <= ANNOTATE_MAX_EXPERTS:
            for (row, col), value in np.ndenumerate(values):
                dark = abs(value) > 0.6 * limit if delta else value < 0.6 * limit
                text = f"{value:+.1%}" if delta else f"{value:.0%}"
                ax.text(col, row, text, ha="center", va="center", fontsize=6, color="white" if dark else "black")
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(textwrap.fill(f"expert load: {report.engine} ({report.backend}), top-{report.top_k}", 100), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
