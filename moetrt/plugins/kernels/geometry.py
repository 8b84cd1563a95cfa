"""Launch geometry of the TopKMoE kernels (contract: moetrt/plugins/contract.py), written once.

The Python launchers call these functions with ints; the TensorRT AOT plugins call the same functions with
`tensorrt.plugin` shape expressions for the token count T, which support `+`, `*` and `//` with an int on
the right. That is why every formula here keeps T on the left of its operators and uses floor division
only. No triton import: `ptx.py` and the TensorRT plugins read this without compiling anything.

Static bounds (every buffer is sized from T and the model's constants, never from routing results, so the
whole op is CUDA-graph safe and needs no host synchronisation):
    pairs       T*k (token, slot) pairs; pair p is token p // k, slot p % k.
    rows_bound  T*k + E*(BLOCK_M - 1): the alignment pads each expert's rows up to a multiple of BLOCK_M, and
                sum_e ceil(c_e / BLOCK_M) * BLOCK_M <= sum_e (c_e + BLOCK_M - 1) = T*k + E*(BLOCK_M - 1).
    blocks_bound ceil(rows_bound / BLOCK_M): GEMM programs along M; those past the real padded row count
                (offsets[E], written by the alignment kernel) exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BLOCK_M = 64  # rows of one expert per GEMM program; the padding granularity of the alignment
ROUTE_BLOCK_T = 16  # tokens per routing program (tl.dot needs >= 16 rows)
ALIGN_CHUNK = 256  # pairs per step of the single-program alignment kernel
# Compile options of every kernel, passed identically by the JIT launchers and the AOT compiler (ptx.py);
# FMA contraction stays on explicitly (triton 3.9 warns when it is left to its changing default). Two
# pipeline stages with BLOCK_K <= 32 keep every kernel within 48 KiB of shared memory in fp32 too: more
# needs a cuFuncSetAttribute opt-in before launch, which a TensorRT AOT plugin cannot request.
COMPILE_OPTIONS = {"num_warps": 4, "num_stages": 2, "enable_fp_fusion": True}
MAX_SHARED_BYTES = 48 * 1024

ROUTE, ALIGN, GEMM1, GEMM2, COMBINE = "route", "align", "gemm1", "gemm2", "combine"
STAGES = (ROUTE, ALIGN, GEMM1, GEMM2, COMBINE)


@dataclass(frozen=True)
class MoeDims:
    """The compile-time constants of one TopKMoE layer: the kernels are specialised on all of them."""

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    normalize: bool = True
    block_m: int = BLOCK_M

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16 (tl.dot's minimum), got {self.block_m}")
        if min(self.hidden_size, self.intermediate_size) < 1:
            raise ValueError("hidden_size and intermediate_size must be positive")


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tile(n: int, lo: int, hi: int) -> int:
    """A power-of-two tile for an extent n, clamped to [lo, hi] (lo = 16: tl.dot's minimum)."""
    return min(hi, max(lo, next_pow2(n)))


def cdiv(a: Any, b: int) -> Any:
    """Ceiling division written with `+` and `//` only, so `a` may be a TensorRT shape expression."""
    return (a + (b - 1)) // b


def rows_bound(num_tokens: Any, dims: MoeDims) -> Any:
    """Rows of the sorted-pair and intermediate buffers: T*k + E*(BLOCK_M - 1) (see the module docstring)."""
    return num_tokens * dims.top_k + dims.num_experts * (dims.block_m - 1)


def blocks_bound(num_tokens: Any, dims: MoeDims) -> Any:
    """Entries of the per-block expert-id buffer, and the GEMM grid along M."""
    return cdiv(rows_bound(num_tokens, dims), dims.block_m)


def experts_pad(dims: MoeDims) -> int:
    """The expert axis padded to a power of two >= 16 (a tl.dot operand and a tl.arange extent)."""
    return max(16, next_pow2(dims.num_experts))


def constexprs(stage: str, dims: MoeDims) -> dict[str, int]:
    """The `tl.constexpr` arguments of a stage's kernel: the launchers and the AOT compiler pass exactly these."""
    h, f, e, k = dims.hidden_size, dims.intermediate_size, dims.num_experts, dims.top_k
    if stage == ROUTE:
        return {"H": h, "E": e, "K": k, "NORMALIZE": int(dims.normalize), "E_PAD": experts_pad(dims),
                "K_PAD": next_pow2(k), "BLOCK_T": ROUTE_BLOCK_T, "BLOCK_H": _tile(h, 16, 128)}  # fmt: skip
    if stage == ALIGN:
        return {"E": e, "K": k, "BLOCK_M": dims.block_m, "E_PAD": experts_pad(dims), "CHUNK": ALIGN_CHUNK}
    if stage == GEMM1:
        return {"H": h, "F": f, "E": e, "K": k, "BLOCK_M": dims.block_m,
                "BLOCK_N": _tile(f, 16, 64), "BLOCK_K": _tile(h, 16, 32)}  # fmt: skip
    if stage == GEMM2:
        return {"H": h, "F": f, "E": e, "K": k, "BLOCK_M": dims.block_m,
                "BLOCK_N": _tile(h, 16, 64), "BLOCK_K": _tile(f, 16, 32)}  # fmt: skip
    if stage == COMBINE:
        return {"H": h, "K": k, "BLOCK_H": _tile(h, 16, 512)}
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def grid(stage: str, dims: MoeDims, num_tokens: Any) -> tuple[Any, Any, Any]:
    """The (x, y, z) launch grid of a stage for T = num_tokens (an int or a TensorRT shape expression)."""
    c = constexprs(stage, dims)
    if stage == ROUTE:
        return cdiv(num_tokens, c["BLOCK_T"]), 1, 1
    if stage == ALIGN:
        return 1, 1, 1  # one program: counts, scan and scatter need no inter-program synchronisation
    if stage == GEMM1:
        return blocks_bound(num_tokens, dims), cdiv(dims.intermediate_size, c["BLOCK_N"]), 1
    if stage == GEMM2:
        return blocks_bound(num_tokens, dims), cdiv(dims.hidden_size, c["BLOCK_N"]), 1
    return num_tokens, cdiv(dims.hidden_size, c["BLOCK_H"]), 1
