"""`moetrt inspect`: what a Mixtral configuration costs (parameters, weight bytes, KV-cache bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moetrt.model.config import DTYPE_BYTES, MixtralConfig, preset

# Weight-only quantised formats store about this many bytes per parameter (int4: 4 bits + an fp16
# scale per block of 32 = 4.5 bits).
QUANT_BYTES = {"int8": 1.0 + 2 / 32, "int4": 0.5 + 2 / 32}


def load_config(checkpoint_dir: Path | None, preset_name: str | None) -> tuple[MixtralConfig, str]:
    """The config of a checkpoint directory or a named preset, with a label saying which."""
    if preset_name is not None:
        return preset(preset_name), f"preset {preset_name}"
    return MixtralConfig.from_pretrained(checkpoint_dir), str(checkpoint_dir)


def summary(config: MixtralConfig) -> dict[str, Any]:
    """Every figure `inspect` prints, as one JSON-ready object."""
    counts = config.param_counts()
    weight_bytes = {dtype: counts["total_params"] * n for dtype, n in DTYPE_BYTES.items()}
    weight_bytes.update({q: int(counts["total_params"] * n) for q, n in QUANT_BYTES.items()})
    active_bytes = {dtype: counts["active_params"] * n for dtype, n in DTYPE_BYTES.items()}
    return {
        "config": config.to_dict(),
        **counts,
        "weight_bytes": weight_bytes,
        "active_weight_bytes_per_token": active_bytes,
        "kv_cache_bytes_per_token": {dtype: config.kv_cache_bytes_per_token(dtype) for dtype in DTYPE_BYTES},
    }
