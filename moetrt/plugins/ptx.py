"""Ahead-of-time compilation of the TopKMoE kernels to PTX for TensorRT's `@trtp.aot_impl` (no GPU needed).

Contract: moetrt/plugins/contract.py. A TensorRT AOT plugin launches exactly one kernel with the arguments
(plugin inputs..., extra int32 scalars..., plugin outputs...) and no workspace, so every kernel in
`moetrt.plugins.kernels` declares its parameters in that order, and `trt_moe.py` exposes one AOT plugin per
stage. This module compiles a stage with `triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", cc, 32))` (triton 3.9: `signature` names every parameter, constexprs included as
"constexpr"; `attrs` maps a parameter index tuple to [["tt.divisibility", 16]]) and returns what the
plugin needs: kernel name, PTX, block size, shared memory and the grid as a function of T.

PTX ISA version. The engine embeds PTX, which the CUDA driver JIT-compiles when the engine is loaded, and a
driver rejects a PTX ISA newer than its own CUDA version. Triton writes the ISA of its bundled ptxas (triton
3.9: 8.8 for sm_80, 9.4 for sm_90a, i.e. drivers for CUDA 12.9 / 13.4), so `compile_stage` pins it with
Triton's `ptx_version` option to `ptx_isa(cc)`: the oldest ISA the target accepts (LLVM's NVPTX processor
table: sm_90a 8.0, sm_100a 8.6, sm_120a 8.7, ...) but at least 8.0 (CUDA 12.0, the oldest CUDA 12 driver).
A GPU's own driver always accepts its target's minimum ISA; ptxas assembling the pinned PTX at compile time
(`triton.compile` runs it) shows the kernels need nothing newer.

Triton >= 3.3 appends two hidden pointer parameters (global and profile scratch) to every kernel; TensorRT
passes only the arguments above. When a kernel needs no scratch (checked) and its PTX never reads them
(checked), they are removed from the PTX entry so the parameter list is exactly the plugin's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moetrt.plugins.kernels import geometry

# Triton type of each kernel parameter in launch order; "D" is the model dtype. Pointer parameters carry a
# 16-byte divisibility hint: TensorRT allocates every plugin input/output (and weight) 256-byte aligned.
SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    geometry.ROUTE: (("hidden_ptr", "*D"), ("router_ptr", "*D"), ("T", "i32"),
                     ("topk_ids_ptr", "*i32"), ("topk_weights_ptr", "*fp32")),
    geometry.ALIGN: (("topk_ids_ptr", "*i32"), ("T", "i32"), ("counts_ptr", "*i32"), ("offsets_ptr", "*i32"),
                     ("sorted_ids_ptr", "*i32"), ("block_expert_ptr", "*i32")),
    geometry.GEMM1: (("hidden_ptr", "*D"), ("w1_ptr", "*D"), ("w3_ptr", "*D"), ("sorted_ids_ptr", "*i32"),
                     ("block_expert_ptr", "*i32"), ("offsets_ptr", "*i32"), ("T", "i32"), ("inter_ptr", "*D")),
    geometry.GEMM2: (("inter_ptr", "*D"), ("w2_ptr", "*D"), ("sorted_ids_ptr", "*i32"), ("block_expert_ptr", "*i32"),
                     ("offsets_ptr", "*i32"), ("T", "i32"), ("expert_out_ptr", "*D")),
    geometry.COMBINE: (("expert_out_ptr", "*D"), ("topk_weights_ptr", "*fp32"), ("T", "i32"), ("out_ptr", "*D")),
}  # fmt: skip

TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# Oldest PTX ISA (major*10 + minor) of the target Triton compiles compute capability cc for (sm_{cc} below 90,
# the arch-specific sm_{cc}a from 90 on), from LLVM's NVPTX.td processor definitions.
TARGET_MIN_PTX = {75: 63, 80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 100: 86, 101: 86, 103: 88, 110: 90, 120: 87, 121: 88}
PTX_FLOOR = 80  # PTX ISA 8.0: CUDA 12.0, accepted by every CUDA 12 and 13 driver
# CUDA version whose driver first accepts a PTX ISA (the inverse of triton's ptx_get_version).
PTX_CUDA = {80: "12.0", 86: "12.7", 87: "12.8", 88: "12.9", 90: "13.0"}


def ptx_isa(cc: int) -> int:
    """The PTX ISA version (e.g. 80 for 8.0) the stages are compiled to for compute capability `cc`."""
    if cc not in TARGET_MIN_PTX:
        raise ValueError(f"compute capability {cc}: no pinned PTX ISA; known: {sorted(TARGET_MIN_PTX)}")
    return max(PTX_FLOOR, TARGET_MIN_PTX[cc])


def ptx_driver(cc: int) -> str:
    """The oldest CUDA version whose driver loads the stages' PTX for compute capability `cc` (e.g. "12.0")."""
    return PTX_CUDA[ptx_isa(cc)]


@dataclass(frozen=True)
class CompiledStage:
    """One stage's kernel, ready for a TensorRT AOT plugin (or any driver-API launch)."""

    stage: str
    dims: geometry.MoeDims
    dtype: str
    cc: int
    kernel_name: str
    ptx: str
    num_warps: int
    shared_mem: int
    params: tuple[str, ...]  # parameter names in launch order, as the PTX entry declares them

    @property
    def block_x(self) -> int:
        return self.num_warps * 32

    def grid(self, num_tokens: Any) -> tuple[Any, Any, Any]:
        """(x, y, z) grid for T = num_tokens (an int or a TensorRT shape expression)."""
        return geometry.grid(self.stage, self.dims, num_tokens)


def kernel_function(stage: str) -> Callable[..., Any]:
    """The @triton.jit kernel of a stage (imports triton)."""
    from moetrt.plugins.kernels import align, combine, expert_gemm, routing

    kernels = {
        geometry.ROUTE: routing.route_kernel,
        geometry.ALIGN: align.align_kernel,
        geometry.GEMM1: expert_gemm.expert_gemm1_kernel,
        geometry.GEMM2: expert_gemm.expert_gemm2_kernel,
        geometry.COMBINE: combine.combine_kernel,
    }
    return kernels[stage]


@functools.cache
def compile_stage(stage: str, dims: geometry.MoeDims, dtype: str, cc: int) -> CompiledStage:
    """Compile one stage for compute capability `cc` (e.g. 80, 90) and model dtype `dtype` ("float16", ...)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(TRITON_DTYPES)}")
    fn = kernel_function(stage)
    consts = geometry.constexprs(stage, dims)
    params = SIGNATURES[stage]
    names = tuple(name for name, _ in params)
    if tuple(fn.arg_names) != names + tuple(consts):
        raise AssertionError(f"{stage}: kernel parameters {fn.arg_names} != {names} + constexprs {tuple(consts)}")
    signature = {name: ty.replace("D", TRITON_DTYPES[dtype]) for name, ty in params}
    signature.update(dict.fromkeys(consts, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, ty) in enumerate(params) if ty.startswith("*")}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = dict(geometry.COMPILE_OPTIONS, ptx_version=ptx_isa(cc))
    kernel = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
    meta = kernel.metadata
    scratch = getattr(meta, "global_scratch_size", 0), getattr(meta, "profile_scratch_size", 0)
    if any(scratch):
        raise RuntimeError(f"{stage}: kernel needs global/profile scratch {scratch}; TensorRT cannot provide it")
    if meta.shared > geometry.MAX_SHARED_BYTES:
        raise RuntimeError(f"{stage}: {meta.shared} bytes of shared memory exceed the {geometry.MAX_SHARED_BYTES} "
                           "a kernel may use without an opt-in that TensorRT AOT launches do not make")  # fmt: skip
    ptx = strip_hidden_params(kernel.asm["ptx"], meta.name, len(names))
    return CompiledStage(stage, dims, dtype, cc, meta.name, ptx, meta.num_warps, meta.shared, names)


def entry_params(ptx: str, kernel_name: str) -> list[str]:
    """The `.param` declarations of a PTX entry, in order."""
    match = re.search(rf"\.entry\s+{re.escape(kernel_name)}\s*\((.*?)\)", ptx, re.DOTALL)
    if match is None:
        raise ValueError(f"no .entry {kernel_name} in the PTX")
    return [p.strip() for p in match.group(1).split(",") if p.strip()]


def strip_hidden_params(ptx: str, kernel_name: str, n_params: int) -> str:
    """Drop the entry parameters after the first `n_params` (triton's scratch pointers), if the body never
    reads them; the result declares exactly the parameters TensorRT passes."""
    declared = entry_params(ptx, kernel_name)
    if len(declared) < n_params:
        raise ValueError(f"{kernel_name}: PTX declares {len(declared)} parameters, expected at least {n_params}")
    extra = declared[n_params:]
    body = ptx[ptx.index("{", ptx.index(f".entry {kernel_name}")) :]
    for decl in extra:
        param = decl.split()[-1]
        if re.search(rf"\b{re.escape(param)}\b", body):
            raise RuntimeError(f"{kernel_name}: hidden parameter {param} is used; it cannot be dropped")
    if not extra:
        return ptx
    start = ptx.index(f".entry {kernel_name}")
    head, close = ptx.index("(", start), ptx.index(")", start)
    kept = ",\n".join(f"\t{decl}" for decl in declared[:n_params])
    return ptx[: head + 1] + "\n" + kept + "\n" + ptx[close:]
