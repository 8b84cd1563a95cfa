"""TensorRT plugins for `moetrt::TopKMoE` (contract: moetrt/plugins/contract.py), with `tensorrt.plugin`.

Two ways to run the op in an engine; `register_plugin(mode)` registers one (tensorrt is imported only there):

JIT   `moetrt::TopKMoE` itself: `@trtp.register` + `@trtp.impl`, which runs `fused_topk_moe` (five Triton
      launches) on TensorRT's stream. The engine calls back into Python, so it needs moetrt, torch and
      triton at runtime.
AOT   TensorRT's ahead-of-time Python plugins launch exactly ONE kernel, with (inputs..., int32 extras...,
      outputs...) as arguments and no workspace (`@trtp.aot_impl` returns one kernel name, one PTX,
      KernelLaunchParams and SymIntExprs). The op needs five kernels and intermediate buffers, so it cannot
      be one AOT plugin; instead each stage is an AOT-only plugin (STAGE_OPS) whose intermediates are
      ordinary TensorRT tensors with static shapes, and `moetrt.engines.trt.lower_for_aot` rewrites every
      TopKMoE node into that chain. The engine then embeds the PTX and runs without Python (e.g. trtexec).
Each plugin has one implementation, so no PREFER_AOT/JIT_PYTHON_PLUGINS network flag is needed. There is
no `@trtp.autotune`: the network is strongly typed (every type is fixed) and each stage has one kernel (no
tactics), which is exactly TensorRT's default combination (the given types, LINEAR).

Attributes vs plugin fields. The ONNX parser looks a plugin up by (op_type, `plugin_version`, default "1",
`plugin_namespace`, default "") and then passes as fields only the node attributes that the plugin creator
lists (onnx-tensorrt `loadFields` iterates the creator's field names). A `tensorrt.plugin` creator has
version "1" and the namespace of its id, and its fields are the register function's attributes. So:
    contract.node_attributes(...) = TOPK_MOE_FIELDS + PARSER_KEYS
where PARSER_KEYS = (plugin_namespace, plugin_version) are lookup keys, never fields, and the stage nodes
carry STAGE_FIELDS + PARSER_KEYS. The plugins must be registered before parsing and before deserializing.

Integer attributes are `Int` = npt.NDArray[np.int32], read with `scalar`. The parser passes an ONNX INT
attribute as an INT32 PluginField of length 1, whose `data` is a numpy array of shape (1,); the
`tensorrt.plugin` creator turns it into the attribute by calling the annotation on it, `int(data)` for an
`int`, which NumPy deprecated in 1.25 and refuses from 2.4 on ("only 0-dimensional arrays can be converted
to Python scalars"), so every TopKMoE node would fail to parse. For an NDArray annotation the creator calls
`data.astype(np.int32)` instead, and a JIT plugin serializes the array as INT32 and gets it back the same
way when the engine is deserialized (tensorrt.plugin `_TemplatePluginCreator.create_plugin`,
`get_fields_to_serialize`; TensorRT 10.9 to 11.1; TensorRT's quickly_deployable_plugins sample declares its
`pads` attribute the same way).

Versions: `aot_impl`, `KernelLaunchParams` and `SymIntExprs` first shipped in TensorRT 10.9, so moetrt needs
tensorrt >= MIN_TENSORRT (pyproject's `trt` extra); `register_plugin` checks only the API of the mode asked for.
"""

# No `from __future__ import annotations`: tensorrt.plugin validates the annotations as live classes.
import inspect
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from moetrt.errors import MoetrtError
from moetrt.plugins import contract
from moetrt.plugins.kernels import geometry
from moetrt.registry import TENSORRT_MISSING

MIN_TENSORRT = "10.9"
# The tensorrt.plugin names each mode calls (TensorRT 10.8 has register/impl but none of the AOT ones).
PLUGIN_API = {
    "aot": ("register", "aot_impl", "TensorDesc", "from_shape_expr", "KernelLaunchParams", "SymIntExprs", "SymInt32"),
    "jit": ("register", "impl", "TensorDesc"),
}
Int = npt.NDArray[np.int32]  # every integer plugin attribute (see the module docstring)
PARSER_KEYS = ("plugin_namespace", "plugin_version")
TOPK_MOE_FIELDS = ("top_k", "normalize")
STAGE_FIELDS = tuple(f.name for f in fields(geometry.MoeDims))  # every stage node carries the layer's dims


@dataclass(frozen=True)
class StageOp:
    """One AOT stage plugin: its ONNX op_type and tensors, named as its kernel's parameters (without `_ptr`)."""

    op_type: str
    stage: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def plugin_id(self) -> str:
        return f"{contract.PLUGIN_NAMESPACE}::{self.op_type}"


STAGE_OPS = (
    StageOp("TopKMoERoute", geometry.ROUTE, ("hidden", "router"), ("topk_ids", "topk_weights")),
    StageOp("TopKMoEAlign", geometry.ALIGN, ("topk_ids",), ("counts", "offsets", "sorted_ids", "block_expert")),
    StageOp("TopKMoEGemm1", geometry.GEMM1, ("hidden", "w1", "w3", "sorted_ids", "block_expert", "offsets"),
            ("inter",)),
    StageOp("TopKMoEGemm2", geometry.GEMM2, ("inter", "w2", "sorted_ids", "block_expert", "offsets"),
            ("expert_out",)),
    StageOp("TopKMoECombine", geometry.COMBINE, ("expert_out", "topk_weights"), ("out",)),
)  # fmt: skip

_registered: set[str] = set()


def scalar(value: np.ndarray) -> int:
    """The integer a plugin attribute holds: TensorRT hands each over as an int32 array of shape (1,)."""
    if np.shape(value) != (1,):
        raise ValueError(f"plugin attribute {value!r}: expected a 1-element array")
    return int(value[0])


def missing_api(trtp: Any, mode: str) -> list[str]:
    """The `tensorrt.plugin` names plugins of `mode` ("aot" or "jit") need that `trtp` lacks."""
    return [name for name in PLUGIN_API[mode] if not hasattr(trtp, name)]


def register_plugin(mode: str) -> None:
    """Register the plugins of one mode with TensorRT (idempotent): "jit" the TopKMoE plugin, "aot" the five
    stage plugins. MoetrtError when TensorRT is missing or too old for that mode."""
    if mode not in PLUGIN_API:
        raise MoetrtError(f"plugins: expected one of {', '.join(PLUGIN_API)}, found {mode!r}")
    if mode in _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        raise MoetrtError(TENSORRT_MISSING) from None
    missing = missing_api(trtp, mode)
    if missing:
        raise MoetrtError(f"TensorRT {trt.__version__} has no tensorrt.plugin.{missing[0]}, which {mode} plugins "
                          f"need; moetrt needs tensorrt>={MIN_TENSORRT}: pip install 'moetrt[trt]'")  # fmt: skip
    (_register_jit if mode == "jit" else _register_stages)(trt, trtp)
    _registered.add(mode)


def _register_jit(trt, trtp) -> None:
    plugin_id = f"{contract.PLUGIN_NAMESPACE}::{contract.OP_TYPE}"

    @trtp.register(plugin_id)
    def topk_moe_desc(
        hidden: trtp.TensorDesc,
        router_weight: trtp.TensorDesc,
        w1: trtp.TensorDesc,
        w3: trtp.TensorDesc,
        w2: trtp.TensorDesc,
        top_k: Int,
        normalize: Int,
    ) -> trtp.TensorDesc:
        return hidden.like()  # the contract's output: hidden's static shape and dtype

    @trtp.impl(plugin_id)
    def topk_moe_impl(hidden, router_weight, w1, w3, w2, top_k, normalize, outputs, stream) -> None:
        import torch

        from moetrt.plugins.kernels.fused import fused_topk_moe

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tensors = [_as_torch(trt, t) for t in (hidden, router_weight, w1, w3, w2)]
            fused_topk_moe(*tensors, scalar(top_k), bool(scalar(normalize)), out=_as_torch(trt, outputs[0]))

    attrs = tuple(inspect.signature(topk_moe_desc).parameters)[len(contract.INPUTS) :]
    if attrs != TOPK_MOE_FIELDS:
        raise AssertionError(f"{plugin_id} registers {attrs}, the contract expects {TOPK_MOE_FIELDS}")


class _CudaArray:
    """A `__cuda_array_interface__` view of a plugin tensor (bf16 as int16 bits, which the interface lacks)."""

    def __init__(self, t, typestr: str, itemsize: int):
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "typestr": typestr,
            "data": (t.data_ptr, False),
            "strides": tuple(s * itemsize for s in t.strides),
            "version": 3,
        }


def _as_torch(trt, t):
    """A zero-copy torch view of a `tensorrt.plugin.Tensor` (torch.as_tensor refuses bf16 plugin tensors)."""
    import numpy as np
    import torch

    if t.dtype == trt.bfloat16:
        return torch.as_tensor(_CudaArray(t, "<i2", 2), device="cuda").view(torch.bfloat16)
    np_dtype = np.dtype(trt.nptype(t.dtype))
    return torch.as_tensor(_CudaArray(t, np_dtype.str, np_dtype.itemsize), device="cuda")


def _register_stages(trt, trtp) -> None:
    """The five AOT-only stage plugins. Each register function gives its outputs' static shapes from the
    bounds in `geometry`; each aot_impl returns the stage's PTX from `moetrt.plugins.ptx`."""
    dtypes = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
    int32 = trt.int32
    launch_annotation = tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]

    def launch(stage: str, dims: geometry.MoeDims, dtype: str, num_tokens) -> tuple:
        """(kernel name, PTX, launch params, extra args) for one stage on this GPU; the only extra arg is T."""
        import torch

        from moetrt.plugins import ptx

        major, minor = torch.cuda.get_device_capability()
        kernel = ptx.compile_stage(stage, dims, dtype, 10 * major + minor)
        gx, gy, gz = kernel.grid(num_tokens)
        params = trtp.KernelLaunchParams(grid_x=gx, grid_y=gy, grid_z=gz, block_x=kernel.block_x,
                                         shared_mem=kernel.shared_mem)  # fmt: skip
        return kernel.kernel_name, kernel.ptx, params, trtp.SymIntExprs.from_tuple([trtp.SymInt32(num_tokens)])

    def dims_of(*values: np.ndarray) -> geometry.MoeDims:
        """The layer's dims from the stage's attributes, in STAGE_FIELDS order."""
        h, f, e, k, normalize, block_m = (scalar(v) for v in values)
        return geometry.MoeDims(h, f, e, k, bool(normalize), block_m)

    route, align, gemm1, gemm2, combine = (op.plugin_id for op in STAGE_OPS)
    Desc = trtp.TensorDesc

    @trtp.register(route)
    def route_desc(hidden: Desc, router: Desc, hidden_size: Int, intermediate_size: Int, num_experts: Int,
                   top_k: Int, normalize: Int, block_m: Int) -> tuple[Desc, Desc]:  # fmt: skip
        t, k = hidden.shape_expr[0], scalar(top_k)
        return trtp.from_shape_expr((t, k), dtype=int32), trtp.from_shape_expr((t, k), dtype=trt.float32)

    @trtp.aot_impl(route)
    def route_aot(hidden, router, hidden_size, intermediate_size, num_experts, top_k, normalize, block_m,
                  outputs, tactic) -> launch_annotation:  # fmt: skip
        dims = dims_of(hidden_size, intermediate_size, num_experts, top_k, normalize, block_m)
        return launch(geometry.ROUTE, dims, dtypes[hidden.dtype], hidden.shape_expr[0])

    @trtp.register(align)
    def align_desc(topk_ids: Desc, hidden_size: Int, intermediate_size: Int, num_experts: Int, top_k: Int,
                   normalize: Int, block_m: Int) -> tuple[Desc, Desc, Desc, Desc]:  # fmt: skip
        dims = dims_of(hidden_size, intermediate_size, num_experts, top_k, normalize, block_m)
        t = topk_ids.shape_expr[0]
        return (trtp.from_shape_expr((dims.num_experts,), dtype=int32),
                trtp.from_shape_expr((dims.num_experts + 1,), dtype=int32),
                trtp.from_shape_expr((geometry.rows_bound(t, dims),), dtype=int32),
                trtp.from_shape_expr((geometry.blocks_bound(t, dims),), dtype=int32))  # fmt: skip

    @trtp.aot_impl(align)
    def align_aot(topk_ids, hidden_size, intermediate_size, num_experts, top_k, normalize, block_m,
                  outputs, tactic) -> launch_annotation:  # fmt: skip
        dims = dims_of(hidden_size, intermediate_size, num_experts, top_k, normalize, block_m)
        return launch(geometry.ALIGN, dims, "float32", topk_ids.shape_expr[0])  # no model-dtype parameter

    @trtp.register(gemm1)
    def gemm1_desc(hidden: Desc, w1: Desc, w3: Desc, sorted_ids: Desc, block_expert: Desc, offsets: Desc,
                   hidden_size: Int, intermediate_size: Int, num_experts: Int, top_k: Int, normalize: Int,
                   block_m: Int) -> Desc:  # fmt: skip
        return trtp.from_shape_expr((sorted_ids.shape_expr[0], scalar(intermediate_size)), dtype=hidden.dtype)

    @trtp.aot_impl(gemm1)
    def gemm1_aot(hidden, w1, w3, sorted_ids, block_expert, offsets, hidden_size, intermediate_size,
                  num_experts, top_k, normalize, block_m, outputs, tactic) -> launch_annotation:  # fmt: skip
        dims = dims_of(hidden_size, intermediate_size, num_experts, top_k, normalize, block_m)
        return launch(geometry.GEMM1, dims, dtypes[hidden.dtype], hidden.shape_expr[0])

    def pairs(sorted_ids, dims: geometry.MoeDims):
        """T*k from the sorted-ids length rows_bound = T*k + E*(BLOCK_M - 1) (gemm2 has no T-shaped input)."""
        return sorted_ids.shape_expr[0] - dims.num_experts * (dims.block_m - 1)

    @trtp.register(gemm2)
    def gemm2_desc(inter: Desc, w2: Desc, sorted_ids: Desc, block_expert: Desc, offsets: Desc, hidden_size: Int,
                   intermediate_size: Int, num_experts: Int, top_k: Int, normalize: Int,
                   block_m: Int) -> Desc:  # fmt: skip
        dims = dims_of(hidden_size, intermediate_size, num_experts, top_k, normalize, block_m)
        return trtp.from_shape_expr((pairs(sorted_ids, dims), dims.hidden_size), dtype=inter.dtype)

    @trtp.aot_impl(gemm2)
    def gemm2_aot(inter, w2, sorted_ids, block_expert, offsets, hidden_size, intermediate_size, num_experts,
                  top_k, normalize, block_m, outputs, tactic) -> launch_annotation:  # fmt: skip
        dims = dims_of(hidden_size, intermediate_size, num_experts, top_k, normalize, block_m)
        return launch(geometry.GEMM2, dims, dtypes[inter.dtype], pairs(sorted_ids, dims) // dims.top_k)

    @trtp.register(combine)
    def combine_desc(expert_out: Desc, topk_weights: Desc, hidden_size: Int, intermediate_size: Int,
                     num_experts: Int, top_k: Int, normalize: Int, block_m: Int) -> Desc:  # fmt: skip
        return trtp.from_shape_expr((topk_weights.shape_expr[0], scalar(hidden_size)), dtype=expert_out.dtype)

    @trtp.aot_impl(combine)
    def combine_aot(expert_out, topk_weights, hidden_size, intermediate_size, num_experts, top_k, normalize,
                    block_m, outputs, tactic) -> launch_annotation:  # fmt: skip
        dims = dims_of(hidden_size, intermediate_size, num_experts, top_k, normalize, block_m)
        return launch(geometry.COMBINE, dims, dtypes[expert_out.dtype], topk_weights.shape_expr[0])

    descs = (route_desc, align_desc, gemm1_desc, gemm2_desc, combine_desc)
    for op, desc in zip(STAGE_OPS, descs, strict=True):
        names = tuple(inspect.signature(desc).parameters)
        if names != op.inputs + STAGE_FIELDS:
            raise AssertionError(f"{op.plugin_id} registers {names}, expected {op.inputs + STAGE_FIELDS}")
