"""TensorRT engines from an export directory: `build_trt_engine`, plus the graph checks and the AOT lowering
(pure onnx, usable without TensorRT).

Why the checks: the TensorRT ONNX parser binds a node with no built-in importer to a plugin found by op_type,
`plugin_version` and `plugin_namespace` (the domain is ignored). For a node that carries `plugin_namespace`,
as TopKMoE does, TensorRT 10.x parsers take the plugin when one is registered under that name and fall back to
a model-local function of the same op_type only when none is (older parsers took the function first). A
TopKMoE node must therefore carry exactly the contract's attributes (moetrt/plugins/contract.py), and the
model must carry no local function named TopKMoE: with one, a missing or misnamed plugin registration would
not fail but silently inline that function (e.g. an ONNX Runtime reference implementation).

Plugins (moetrt/plugins/trt_moe.py): plugins="aot" (default) lowers each TopKMoE node into the five AOT
stage plugins, whose PTX is embedded in the engine, so the engine runs without Python; plugins="jit" keeps
the TopKMoE node and calls back into moetrt/torch/triton at runtime.

Per-layer values: with layer_outputs (default) each TopKMoE node's input and output (`moetrt.names`
moe_input(i) / moe_output(i)) become network outputs, so `moetrt validate` can compare an engine layer by
layer; the router's logits stay inside the route kernel and are not among them.

Attention is bounded by the live length: `prepare_graph` gives the graph a shape input `kv_live` [L] and
slices each layer's cache reads, key-position mask and softmax split to the first L slots
(moetrt/engines/trt_attention.py; the rewrite is pure ONNX and tested in ONNX Runtime against the unbounded
export). The runtime sets L to the batch's longest cached length each step (decode: rounded up to a power of
two, one CUDA graph per bucket), so a step reads L slots of the static cache, not max_seq_len; the
optimization profiles give `kv_live` the range 1..max_seq_len. (ONNX Runtime engines use
GroupQueryAttention over each row's own length instead, moetrt/engines/ort_attention.py.)

Engine directory: model.engine (the serialized engine) and moetrt.json (kind "engine", backend "trt",
with the export's config, dtype, limits and graph I/O, the optimization profiles, the plugin mode, the
per-layer outputs and, for AOT engines, the PTX ISA and the CUDA driver it needs).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from moetrt import names
from moetrt.artifacts import (
    FileDigest,
    carry_tokenizer,
    check_output_dir,
    file_records,
    lineage,
    read_manifest,
    write_manifest,
)
from moetrt.engines.trt_attention import bound_attention
from moetrt.errors import MoetrtError
from moetrt.fsutil import atomic_dir
from moetrt.names import ENGINE_FILE, KV_LIVE, MODEL_FILE
from moetrt.plugins import contract
from moetrt.plugins.kernels import geometry
from moetrt.plugins.trt_moe import PLUGIN_API, STAGE_FIELDS, STAGE_OPS
from moetrt.progress import Progress, silent
from moetrt.registry import TENSORRT_MISSING

PRECISIONS = {"fp16": "float16", "bf16": "bfloat16"}
PLUGIN_MODES = tuple(PLUGIN_API)
_ONNX_TYPES = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}
DEFAULT_TIMING_CACHE = Path.home() / ".cache" / "moetrt" / "trt-timing.cache"
_ATTR_TYPES = {int: onnx.AttributeProto.INT, str: onnx.AttributeProto.STRING}
DECODE_LIVE_OPT = 1024  # the live length the decode profile's kernels are tuned for


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
    """Optimization profiles over the dynamic axes (batch, seq, and `kv_live`'s length: the cache slots a step
    reads): prefill (any seq up to max_seq_len) and decode (seq = 1), each as min/opt/max."""
    opt_seq = min(prefill_opt, max_seq_len)
    return {
        "prefill": {"batch": [1, max_batch, max_batch], "seq": [1, opt_seq, max_seq_len],
                    "live": [1, opt_seq, max_seq_len]},
        "decode": {"batch": [1, max_batch, max_batch], "seq": [1, 1, 1],
                   "live": [1, min(DECODE_LIVE_OPT, max_seq_len), max_seq_len]},
    }  # fmt: skip


def _input_shapes(name: str, shape: tuple[int, ...], axes: dict[str, list[int]]) -> list[tuple[int, ...]]:
    """min/opt/max shapes of one network input: axis 0 is batch (`kv_live`'s: live), axis 1 of the token
    inputs is seq."""
    out = []
    for i in range(3):
        dims = []
        for axis, d in enumerate(shape):
            if d >= 0:
                dims.append(d)
            elif name == KV_LIVE:
                dims.append(axes["live"][i])
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


def layer_output_names(model: onnx.ModelProto) -> list[str]:
    """moe_input(i), moe_output(i) of every TopKMoE node, in graph order: the values the exporter names that way
    (`moetrt.names`) and validation compares. MoetrtError if a node's values are named otherwise."""
    found = []
    for node in model.graph.node:
        if node.op_type != contract.OP_TYPE:
            continue
        value_in, value_out = node.input[0], node.output[0]
        try:
            layer = names.layer_of(value_out)
        except ValueError:
            layer = -1
        if (value_in, value_out) != (names.moe_input(layer), names.moe_output(layer)):
            raise MoetrtError(f"TopKMoE node {node.name!r}: values {value_in!r} -> {value_out!r}, expected "
                              "layers.<i>.moe_input -> layers.<i>.moe_output (`moetrt export` names)")  # fmt: skip
        found += [value_in, value_out]
    return found


def prepare_graph(
    model_path: Path, plugins: str, dtype: str, layer_outputs: bool = True
) -> tuple[onnx.ModelProto, list[str]]:
    """The graph TensorRT parses (weights stay in the external data file) and the per-layer values it returns:
    `check_trt_graph`, the attention bounded by the shape input `kv_live` (trt_attention.bound_attention, at
    the export's cache length), then (layer_outputs) `layer_output_names` appended as graph outputs of element
    type `dtype` (onnx-tensorrt marks every graph output as a network output of its ONNX type), then, for
    plugins="aot", `lower_for_aot`."""
    if not model_path.is_file():
        raise MoetrtError(f"{model_path}: not found; expected the exported ONNX graph")
    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends: a truncated or foreign file
        raise MoetrtError(f"{model_path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
    check_trt_graph(model)
    inputs = {value.name: value for value in model.graph.input}
    layers = 0
    while names.past_key(layers) in inputs:
        layers += 1
    if layers == 0:
        raise MoetrtError(f"{model_path}: no {names.past_key(0)!r} input; expected a graph from `moetrt export`")
    cache_len = inputs[names.past_key(0)].type.tensor_type.shape.dim[2].dim_value
    try:
        bound_attention(model, layers, cache_len)
    except MoetrtError as err:
        raise MoetrtError(f"{model_path}: {err}") from None
    outputs = layer_output_names(model) if layer_outputs else []
    present = {value.name for value in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(name, _ONNX_TYPES[dtype], None) for name in outputs if name not in present
    )
    return (lower_for_aot(model) if plugins == "aot" else model), outputs


def parse_network(
    trt: Any, builder: Any, logger: Any, model: onnx.ModelProto, model_path: Path, plugins: str
) -> tuple[Any, Any]:
    """A strongly typed network parsed from `model` (from `prepare_graph`; its external weights are found
    beside `model_path`), with the `plugins` mode's plugins registered first. Returns (network, parser):
    the parser owns the weights, so it must outlive the build."""
    from moetrt.plugins.trt_moe import register_plugin

    register_plugin(plugins)  # before parsing: the parser's plugin fallback looks the creators up
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise MoetrtError(f"{model_path}: TensorRT could not parse the graph: {errors[0] if errors else 'no detail'}")
    return network, parser


def check_build(
    export_dir: Path,
    output_dir: Path,
    precision: str,
    device: str | None,
    max_batch: int | None,
    max_seq_len: int | None,
    plugins: str,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Every check of a TensorRT build that needs no TensorRT, in the ORT build's order (output directory,
    export manifest, graph-only export), then the TensorRT-specific ones. Returns the export's manifest and
    the engine's limits {max_batch, max_seq_len}; MoetrtError (one line) for the first problem."""
    check_output_dir(output_dir, export_dir, "export")
    manifest = read_manifest(export_dir, "export")
    if not manifest.get("weights", True):
        raise MoetrtError(f"{export_dir}: a graph-only export (no weights); re-export with weights to build an engine")
    if precision not in PRECISIONS:
        raise MoetrtError(f"precision: expected one of {', '.join(PRECISIONS)}, found {precision!r}")
    if PRECISIONS[precision] != manifest["dtype"]:
        raise MoetrtError(f"precision {precision}: the export is {manifest['dtype']}, and a strongly typed engine "
                          f"keeps the graph's types; re-export with dtype {PRECISIONS[precision]}")  # fmt: skip
    if device not in (None, "cuda"):
        raise MoetrtError(f"device: TensorRT engines are built for and run on a CUDA GPU, found {device!r}")
    if plugins not in PLUGIN_MODES:
        raise MoetrtError(f"plugins: expected one of {', '.join(PLUGIN_MODES)}, found {plugins!r}")
    limits = {"max_batch": max_batch, "max_seq_len": max_seq_len}
    for key, value in limits.items():
        if value is None:
            limits[key] = manifest[key]
        elif not 1 <= value <= manifest[key]:
            raise MoetrtError(f"{key}: {value} is outside [1, {manifest[key]}] (the export's limit)")
    return manifest, limits


def build_trt_engine(
    export_dir: str | Path,
    output_dir: str | Path,
    precision: str = "fp16",
    threads: int | None = None,
    device: str | None = None,
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    plugins: str = "aot",
    layer_outputs: bool = True,
    timing_cache: str | Path | None = DEFAULT_TIMING_CACHE,
    workspace_gib: float | None = None,
    progress: Progress | None = None,
) -> Path:
    """Build a strongly typed TensorRT engine from an export; returns the engine directory.

    precision must match the export's dtype (a strongly typed network keeps the graph's types). threads and
    device complete the registry's common builder signature: threads (CPU threads) do not apply to a GPU
    build, and device must be None or "cuda" (an engine runs on the kind of GPU it was built on).
    max_batch / max_seq_len default to, and may not exceed, the export's. layer_outputs marks each layer's
    moe_input / moe_output as engine outputs (for validation). The timing cache file is read if present and
    rewritten after the build (None disables it). progress hears of the build's phases (moetrt.progress).
    Every check that needs no TensorRT
    (`check_build`, `prepare_graph`) runs before tensorrt is imported.
    """
    export_dir, output_dir = Path(export_dir), Path(output_dir)
    manifest, limits = check_build(export_dir, output_dir, precision, device, max_batch, max_seq_len, plugins)
    model_path = export_dir / MODEL_FILE
    graph, outputs = prepare_graph(model_path, plugins, manifest["dtype"], layer_outputs)
    try:
        import tensorrt as trt
    except ImportError:
        raise MoetrtError(TENSORRT_MISSING) from None

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = parse_network(trt, builder, logger, graph, model_path, plugins)

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

    (progress or silent)("building the TensorRT engine", 0, 0)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MoetrtError(f"{model_path}: TensorRT failed to build the engine (see the log above)")
    if cache_path is not None:
        _write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))

    with atomic_dir(output_dir) as tmp:
        (tmp / ENGINE_FILE).write_bytes(memoryview(serialized))
        engine_digest = FileDigest(tmp / ENGINE_FILE)
        engine_digest.add(0, memoryview(serialized))  # hashed from the bytes just written, not re-read
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
            "attention": KV_LIVE,  # bounded by the shape input kv_live (trt_attention)
            "layer_outputs": outputs,
            "ptx": _ptx_record() if plugins == "aot" else None,
            "profiles": shapes,
            "engine": ENGINE_FILE,
            "file_records": file_records(tmp, {ENGINE_FILE: engine_digest}),
        }
        write_manifest(tmp, "engine", body)
        carry_tokenizer(export_dir, tmp)
    return output_dir


def _ptx_record() -> dict[str, Any]:
    """The PTX the AOT stages embed for this GPU: its ISA and the oldest CUDA driver that loads it."""
    import torch

    from moetrt.plugins import ptx

    major, minor = torch.cuda.get_device_capability()
    cc = 10 * major + minor
    isa = ptx.ptx_isa(cc)
    return {"compute_capability": cc, "isa": f"{isa // 10}.{isa % 10}", "cuda_driver": ptx.ptx_driver(cc)}
