"""Weight-only block quantization in the layout `com.microsoft::QMoE` reads on CPU (ONNX Runtime 1.32).

Layout (checked numerically against a dequantized reference in tests/test_ort_engine.py):
    weights  uint8 [E, N, K * bits / 8]: row n of expert e is the K-long input row of the fp32 weight
             [E, N, K] ("raw" layout, attribute weights_prepacked left at its default); int4 packs two
             values per byte, the even k in the low nibble.
    scales   [E, N, K / block] in the activation dtype.
    no zero points: ORT then uses 2^(bits-1), so a stored u means (u - 2^(bits-1)) * scale.
Quantization is symmetric round-to-nearest per block of `block` consecutive k, with the scale chosen so the
block's largest-magnitude weight maps to -2^(bits-1) exactly (the scale is negative when that weight is
positive; ORT accepts signed scales): that uses the code the max|w|/(2^(bits-1)-1) rule leaves idle and cuts
int4's RMS error ~11% on Gaussian weights. An all-zero block gets scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantSpec:
    """How one precision maps onto QMoE attributes."""

    bits: int
    block: int
    accuracy_level: int  # MatMulNBits meaning: 4 lets the CPU kernel use int8 activations


def quantize(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] (one expert) -> packed uint8 [N, K * bits / 8] and float32 scales [N, K / block]."""
    n, k = w.shape
    lowest = -(2 ** (spec.bits - 1))
    blocks = w.astype(np.float32, copy=False).reshape(n, k // spec.block, spec.block)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scales = extreme / lowest
    scales[scales == 0] = 1.0
    q = np.rint(blocks / scales[..., None]).clip(lowest, -lowest - 1).astype(np.int16) - lowest
    u = q.reshape(n, k).astype(np.uint8)
    if spec.bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return u, scales.astype(np.float32)
