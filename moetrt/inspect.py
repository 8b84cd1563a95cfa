"""`moetrt inspect`: what a Mixtral configuration costs (parameters, weight bytes, KV-cache bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moetrt.model.config import DTYPE_BYTES, MixtralConfig, preset
from moetrt.model.sizes import weight_bytes

# `weight_bytes` keys: the float dtypes by name, then the quantized engine precisions.
WEIGHT_FORMATS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8", "int4": "int4"}


def load_config(checkpoint_dir: Path | None, preset_name: str | None) -> tuple[MixtralConfig, str]:
    """The config of a checkpoint directory or a named preset, with a label saying which."""
    if preset_name is not None:
        return preset(preset_name), f"preset {preset_name}"
    return MixtralConfig.from_pretrained(checkpoint_dir), str(checkpoint_dir)


def summary(config: MixtralConfig) -> dict[str, Any]:
    """Every figure `inspect` prints, as one JSON-ready object."""
    counts = config.param_counts()
    stored = {name: weight_bytes(config, precision) for name, precision in WEIGHT_FORMATS.items()}
    active_bytes = {dtype: counts["active_params"] * n for dtype, n in DTYPE_BYTES.items()}
    return {
        "config": config.to_dict(),
        **counts,
        "weight_bytes": stored,
        "active_weight_bytes_per_token": active_bytes,
        "kv_cache_bytes_per_token": {dtype: config.kv_cache_bytes_per_token(dtype) for dtype in DTYPE_BYTES},
    }
