"""Bytes per weight, written once: what each precision's engine stores per parameter, by part of the model.

`moetrt inspect` (weights in memory), `moetrt bench` (bytes a decode step reads, for the bandwidth bound)
and the peer baselines all read these figures.

    float precisions   fp32 4 bytes, fp16 / bf16 2 bytes, every weight.
    int8 / int4        block-wise weight-only quantization as ONNX Runtime's QMoE / MatMulNBits store it:
                       bits/8 bytes per weight plus one scale per block of `QUANT_BLOCK` weights, the scale in
                       the activation dtype (float32: quantized engines are built from fp32 exports), so
                       int8 = 1 + 4/32 = 1.125 and int4 = 0.5 + 4/32 = 0.625 bytes. Only the experts, the
                       attention projections and lm_head are quantized; the routers (their logits choose the
                       experts), the embedding table (a Gather) and the norms stay float32.
"""

from __future__ import annotations

from typing import Any

from moetrt.model.config import DTYPE_BYTES

QUANT_BITS = {"int8": 8, "int4": 4}
QUANT_BLOCK = 32
SCALE_BYTES = DTYPE_BYTES["float32"]
QUANTIZED_PARTS = ("attention", "experts", "lm_head")
PARTS = ("embedding", "attention", "experts", "router", "norms", "lm_head")

BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    **{name: bits / 8 + SCALE_BYTES / QUANT_BLOCK for name, bits in QUANT_BITS.items()},
}


def part_bytes_per_param(precision: str) -> dict[str, float]:
    """Bytes per parameter of each part of the model (`PARTS`) in an engine of `precision`."""
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(BYTES_PER_PARAM)}")
    if precision not in QUANT_BITS:
        return dict.fromkeys(PARTS, BYTES_PER_PARAM[precision])
    return {part: BYTES_PER_PARAM[precision if part in QUANTIZED_PARTS else "fp32"] for part in PARTS}


def weight_bytes(config: Any, precision: str) -> int:
    """Bytes of all weights of `config` (a MixtralConfig) as an engine of `precision` stores them
    (`part_bytes_per_param`). lm_head counts even when tied to the embedding: the exported graph's lm_head
    MatMul reads its own (transposed, or quantized) copy of the table."""
    counts = config.param_counts()
    parts = {part: counts[f"{part}_params"] for part in ("embedding", "attention", "router", "lm_head")}
    parts["experts"] = counts["expert_params"]
    parts["norms"] = counts["total_params"] - sum(parts.values())
    parts["lm_head"] = config.vocab_size * config.hidden_size
    per_param = part_bytes_per_param(precision)
    return int(sum(n * per_param[part] for part, n in parts.items()))
