"""TensorRT engines from an export directory: `build_trt_engine`, plus the graph checks and the AOT lowering
(pure onnx, usable without TensorRT).

Why the checks: the TensorRT ONNX parser resolves a node with no built-in importer first to a model-local
function of the same op_type, and only then to a plugin (found by op_type, `plugin_version` and
`plugin_namespace`; the domain is ignored). A TopKMoE node must therefore carry exactly the contract's
attributes (moetrt/plugins/contract.py) and the model must carry no local function named TopKMoE, or the
parser would inline that function (e.g. an ONNX Runtime reference implementation) instead of the plugin.

Plugins (moetrt/plugins/trt_moe.py): plugins="aot" (default) lowers each TopKMoE node into the five AOT
stage plugins, whose PTX is embedded in the engine, so the engine runs without Python; plugins="jit" keeps
the TopKMoE node and calls back into moetrt/torch/triton at runtime.

Engine directory: model.engine (the serialized engine) and moetrt.json (kind "engine", backend "trt",
with the export's config, dtype, limits and graph I/O, the optimization profiles and the plugin mode).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from moetrt.artifacts import carry_tokenizer, lineage, read_manifest, write_manifest
from moetrt.errors import MoetrtError
from moetrt.fsutil import atomic_dir
from moetrt.names import MODEL_FILE
from moetrt.plugins import contract
from moetrt.plugins.kernels import geometry
from moetrt.plugins.trt_moe import STAGE_FIELDS, STAGE_OPS
from moetrt.registry import TENSORRT_MISSING

ENGINE_FILE = "model.engine"
PRECISIONS = {"fp16": "float16", "bf16": "bfloat16"}
PLUGIN_MODES = ("aot", "jit")
DEFAULT_TIMING_CACHE = Path.home() / ".cache" / "moetrt" / "trt-timing.cache"
_ATTR_TYPES = {int: onnx.AttributeProto.INT, str: onnx.AttributeProto.STRING}


def check_trt_graph(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The model's TopKMoE nodes, after checking that the TensorRT parser will bind each to the plugin:
    exactly `contract.node_attributes` (names, types, namespace and version values), five inputs, one
    output, and no model-local function named TopKMoE. Raises MoetrtError naming the first offence."""
    shadows = [f"{f.domain}::{f.name}" for f in model.functions if f.name == contract.OP_TYPE]
    if shadows:
        raise MoetrtError(
            f"the graph carries a local function {shadows[0]}; the TensorRT parser would inline it instead of "
            "the TopKMoE plugin (remove model.functions entries named TopKMoE)"
        )
    expected = contract.node_attributes(top_k=1)
    nodes = [n for n in model.graph.node if n.op_type == contract.OP_TYPE]
    for node in nodes:
        where = f"TopKMoE node {node.name or node.output[0]!r}"
        attrs = {a.name: a for a in node.attribute}
        if set(attrs) != set(expected):
            raise MoetrtError(f"{where}: attributes {sorted(attrs)}, the contract requires {sorted(expected)}")
        for name, attr in attrs.items():
            want = contract.ATTRIBUTE_TYPES[name]
            if attr.type != _ATTR_TYPES[want]:
                raise MoetrtError(f"{where}: attribute {name} is an ONNX {attr.type}, expected {want.__name__}")
        values = {name: helper.get_attribute_value(attr) for name, attr in attrs.items()}
        for key in ("plugin_namespace", "plugin_version"):
            if values[key].decode() != expected[key]:
                raise MoetrtError(f"{where}: {key} is {values[key].decode()!r}, the plugin registers {expected[key]!r}")
        if values["top_k"] < 1 or values["normalize"] not in (0, 1):
            raise MoetrtError(f"{where}: top_k {values['top_k']} / normalize {values['normalize']} out of range")
        if len(node.input) != len(contract.INPUTS) or len(node.output) != len(contract.OUTPUTS):
            raise MoetrtError(f"{where}: {len(node.input)} inputs and {len(node.output)} outputs, expected 5 and 1")
    return nodes


def lower_for_aot(model: onnx.ModelProto, block_m: int = geometry.BLOCK_M) -> onnx.ModelProto:
    """A copy of `model` whose TopKMoE nodes are each replaced, in place, by the chain of AOT stage plugin nodes
    (route, align, gemm1, gemm2, combine; see moetrt/plugins/trt_moe.py). The stage nodes carry the layer's
    dims as fields; the weights' shapes come from the initializers (their data is not needed)."""
    nodes = check_trt_graph(model)
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    del lowered.graph.node[:]
    targets = {id(n) for n in nodes}
    for node in model.graph.node:
        if id(node) in targets:
            lowered.graph.node.extend(_stage_nodes(node, shapes, block_m))
        else:
            lowered.graph.node.append(node)
    return lowered


def _stage_nodes(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]], block_m: int) -> list[onnx.NodeProto]:
    hidden, router, w1, w3, w2 = node.input
    for name in (router, w1, w3, w2):
        if name not in shapes:
            raise MoetrtError(f"TopKMoE node {node.name!r}: {name!r} is not an initializer, as the contract requires")
    e, f, h = shapes[w1]
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    dims = geometry.MoeDims(h, f, e, values["top_k"], bool(values["normalize"]), block_m)
    fields = {name: int(value) for name, value in asdict(dims).items()}
    assert tuple(fields) == STAGE_FIELDS
    prefix = node.name or node.output[0]
    tensors = {"hidden": hidden, "router": router, "w1": w1, "w3": w3, "w2": w2, "out": node.output[0]}
    stage_nodes = []
    for op in STAGE_OPS:
        for name in op.outputs:
            tensors.setdefault(name, f"{prefix}/{name}")
        stage_nodes.append(helper.make_node(
            op.op_type, [tensors[n] for n in op.inputs], [tensors[n] for n in op.outputs],
            name=f"{prefix}/{op.op_type}", domain=contract.DOMAIN, **fields,
            plugin_namespace=contract.PLUGIN_NAMESPACE, plugin_version=contract.PLUGIN_VERSION,
        ))  # fmt: skip
    return stage_nodes


def profiles(max_batch: int, max_seq_len: int, prefill_opt: int = 128) -> dict[str, dict[str, list[int]]]:
    """Optimization profiles over the two dynamic axes (batch, seq): prefill (any seq up to max_seq_len) and
    decode (seq = 1), each as min/opt/max."""
    opt_seq = min(prefill_opt, max_seq_len)
    return {
        "prefill": {"batch": [1, max_batch, max_batch], "seq": [1, opt_seq, max_seq_len]},
        "decode": {"batch": [1, max_batch, max_batch], "seq": [1, 1, 1]},
    }


def _input_shapes(name: str, shape: tuple[int, ...], axes: dict[str, list[int]]) -> list[tuple[int, ...]]:
    """min/opt/max shapes of one network input: axis 0 is batch, axis 1 of the token inputs is seq."""
    out = []
    for i in range(3):
        dims = []
        for axis, d in enumerate(shape):
            if d >= 0:
                dims.append(d)
            elif axis == 0:
                dims.append(axes["batch"][i])
            elif axis == 1 and name in ("input_ids", "position_ids"):
                dims.append(axes["seq"][i])
            else:
                raise MoetrtError(f"network input {name}: dynamic axis {axis} of {shape}; only batch and seq may be")
        out.append(tuple(dims))
    return out


def _write_atomic(path: Path, data: memoryview) -> None:
    """Replace `path` in one rename, so a concurrent build never reads a half-written timing cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as err:
        raise MoetrtError(f"{path}: cannot write the timing cache ({err.strerror})") from None


def parse_network(trt: Any, builder: Any, logger: Any, model_path: Path, plugins: str = "aot") -> tuple[Any, Any]:
    """A strongly typed network parsed from an ONNX file (external weights beside it), TopKMoE nodes bound
    to the plugins after `check_trt_graph`. Returns (network, parser): the parser owns the weights, so it
    must outlive the build."""
    from moetrt.plugins.trt_moe import register_plugin

    graph = onnx.load(model_path, load_external_data=False)
    check_trt_graph(graph)
    register_plugin()  # before parsing: the parser's plugin fallback looks the creators up
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if plugins == "aot":
        ok = parser.parse(lower_for_aot(graph).SerializeToString(), str(model_path))  # path: external weights
    else:
        ok = parser.parse_from_file(str(model_path))
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise MoetrtError(f"{model_path}: TensorRT could not parse the graph: {errors[0] if errors else 'no detail'}")
    return network, parser


def build_trt_engine(
    export_dir: str | Path,
    output_dir: str | Path,
    precision: str = "fp16",
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    plugins: str = "aot",
    timing_cache: str | Path | None = DEFAULT_TIMING_CACHE,
    workspace_gib: float | None = None,
) -> Path:
    """Build a strongly typed TensorRT engine from an export; returns the engine directory.

    precision must match the export's dtype (a strongly typed network keeps the graph's types);
    max_batch / max_seq_len default to, and may not exceed, the export's. The timing cache file is read
    if present and rewritten after the build (None disables it).
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise MoetrtError(TENSORRT_MISSING) from None
    export_dir, output_dir = Path(export_dir), Path(output_dir)
    manifest = read_manifest(export_dir, "export")
    if not manifest.get("weights", True):
        raise MoetrtError(f"{export_dir}: a graph-only export (no weights); re-export with weights to build an engine")
    if precision not in PRECISIONS:
        raise MoetrtError(f"precision: expected one of {', '.join(PRECISIONS)}, found {precision!r}")
    if PRECISIONS[precision] != manifest["dtype"]:
        raise MoetrtError(f"precision {precision}: the export is {manifest['dtype']}, and a strongly typed engine "
                          f"keeps the graph's types; re-export with dtype {PRECISIONS[precision]}")  # fmt: skip
    if plugins not in PLUGIN_MODES:
        raise MoetrtError(f"plugins: expected one of {', '.join(PLUGIN_MODES)}, found {plugins!r}")
    limits = {"max_batch": max_batch, "max_seq_len": max_seq_len}
    for key, value in limits.items():
        if value is None:
            limits[key] = manifest[key]
        elif not 1 <= value <= manifest[key]:
            raise MoetrtError(f"{key}: {value} is outside [1, {manifest[key]}] (the export's limit)")
    model_path = export_dir / MODEL_FILE

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser = parse_network(trt, builder, logger, model_path, plugins)

    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    shapes = profiles(limits["max_batch"], limits["max_seq_len"])
    for axes in shapes.values():
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            profile.set_shape(tensor.name, *_input_shapes(tensor.name, tuple(tensor.shape), axes))
        config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=True)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MoetrtError(f"{model_path}: TensorRT failed to build the engine (see the log above)")
    if cache_path is not None:
        _write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))

    with atomic_dir(output_dir) as tmp:
        (tmp / ENGINE_FILE).write_bytes(memoryview(serialized))
        body = {
            "backend": "trt",
            "tensorrt_version": trt.__version__,
            "config": manifest["config"],
            "dtype": manifest["dtype"],
            "precision": precision,
            "max_batch": limits["max_batch"],
            "max_seq_len": limits["max_seq_len"],
            "io": manifest.get("io", {}),
            **lineage(export_dir, manifest),
            "plugins": plugins,
            "profiles": shapes,
            "engine": ENGINE_FILE,
        }
        write_manifest(tmp, "engine", body)
        carry_tokenizer(export_dir, tmp)
    return output_dir
