"""Weight-only block quantization in the layout ONNX Runtime's CPU kernels read (onnxruntime 1.32):
`com.microsoft::QMoE` for the experts and `com.microsoft::MatMulNBits` for the dense projections.

Layout (checked numerically against a dequantized reference in tests/test_ort_engine.py):
    weights  uint8 [..., N, ceil(K / block) * block * bits / 8]: row n is the K-long input row of the float
             weight [..., N, K] (QMoE's "raw" layout with weights_prepacked at its default; MatMulNBits reads
             the same bytes as [N, k_blocks, blob]); int4 packs two values per byte, the even k in the low
             nibble. A K that is not a multiple of the block is zero-padded (MatMulNBits allows it; QMoE
             callers check divisibility themselves).
    scales   [..., N, ceil(K / block)] in the activation dtype.
    no zero points: ORT then uses 2^(bits-1), so a stored u means (u - 2^(bits-1)) * scale.
Quantization is symmetric round-to-nearest per block of `block` consecutive k, with the scale chosen so the
block's largest-magnitude weight maps to -2^(bits-1) exactly (the scale is negative when that weight is
positive; ORT accepts signed scales): that uses the code the max|w|/(2^(bits-1)-1) rule leaves idle and cuts
int4's RMS error ~11% on Gaussian weights. An all-zero block gets scale 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class QuantSpec:
    """How one precision maps onto QMoE / MatMulNBits attributes."""

    bits: int
    block: int
    accuracy_level: int  # MatMulNBits meaning: 4 lets the CPU kernel use int8 activations

    def packed_shape(self, n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of one [N, K] matrix's packed weights and scales."""
        blocks = -(-k // self.block)
        return (n, blocks * self.block * self.bits // 8), (n, blocks)


def quantize(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] (one expert or one projection) -> packed uint8 weights and float32 scales (module layout)."""
    n, k = w.shape
    lowest = -(2 ** (spec.bits - 1))
    w = w.astype(np.float32, copy=False)
    if k % spec.block:
        w = np.pad(w, ((0, 0), (0, spec.block - k % spec.block)))
    blocks = w.reshape(n, -1, spec.block)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scales = extreme / lowest
    scales[scales == 0] = 1.0
    q = np.rint(blocks / scales[..., None]).clip(lowest, -lowest - 1).astype(np.int16) - lowest
    u = q.reshape(n, -1).astype(np.uint8)
    if spec.bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return u, scales.astype(np.float32)


class LazyQuantized:
    """Packed weights and scales of `count` [N, K] matrices as two `onnx_ir.LazyTensor`s, quantized on the
    first request for either.

    The two are separate initializers but come from one pass over the source; the result is kept until
    both have been written (the saver writes them one after the other) and then released, so a build holds
    one quantized tensor at a time.
    """

    def __init__(
        self,
        matrix: Callable[[int], np.ndarray],
        count: int,
        n: int,
        k: int,
        spec: QuantSpec,
        scale_dtype: ir.DataType,
    ):
        self._matrix, self._count, self._spec, self._scale_dtype = matrix, count, spec, scale_dtype
        self._shapes = dict(zip(("weight", "scales"), spec.packed_shape(n, k), strict=True))
        self._result: dict[str, np.ndarray] = {}
        self._pending: set[str] = set()

    def tensors(self, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, ir.LazyTensor]:
        """{"weight": uint8, "scales": float} lazy tensors, [count, N, ...] or reshaped to `shapes`."""
        shapes = shapes or {part: (self._count, *shape) for part, shape in self._shapes.items()}
        dtypes = {"weight": ir.DataType.UINT8, "scales": self._scale_dtype}
        return {
            part: ir.LazyTensor(
                lambda p=part: ir.Tensor(self._take(p).reshape(shapes[p]), dtype=dtypes[p]),
                dtype=dtypes[part],
                shape=ir.Shape(shapes[part]),
            )
            for part in dtypes
        }

    def _take(self, part: str) -> np.ndarray:
        if not self._pending:
            self._compute()
        self._pending.discard(part)
        array = self._result[part]
        if not self._pending:
            self._result = {}
        return array

    def _compute(self) -> None:
        weight = np.empty((self._count, *self._shapes["weight"]), dtype=np.uint8)
        scales = np.empty((self._count, *self._shapes["scales"]), dtype=np.float32)
        for j in range(self._count):
            weight[j], scales[j] = quantize(self._matrix(j), self._spec)
        self._result = {"weight": weight, "scales": scales.astype(self._scale_dtype.numpy())}
        self._pending = {"weight", "scales"}
