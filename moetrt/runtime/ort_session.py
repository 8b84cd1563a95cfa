"""ONNX Runtime sessions for moetrt engines, configured in exactly one place.

Tests, benchmarks and `OrtBackend` all call `create_session`, so the thread count, graph optimization level
and execution provider an engine is validated with are the ones it is served with.

No optimized graph is cached in the engine directory: the builder already folds the exporter's weight
Transposes (moetrt/engines/ort_fold.py), which was the bulk of ORT's load-time optimization (mid preset
fp32: 1.46 s -> 0.73 s; ORT's own serialized basic-level graph loaded in the same 0.70-0.83 s but cost a
second write of every weight). What remains at load is ORT's prepacking of MatMul/QMoE weights, whose
serialized form (`session.save_external_prepacked_constant_initializers`) is CPU-specific and doubled the
int4 engine's size for 3.1 s -> 1.6 s.

`device="cuda"` is a thin switch: the same graph and code path with CUDAExecutionProvider first. It
needs the `onnxruntime-gpu` wheel, which replaces (and cannot coexist with) the CPU-only `onnxruntime`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from moetrt.devices import providers
from moetrt.errors import MoetrtError
from moetrt.names import MODEL_FILE, ROUTE_FUNCTION, expert_ids, expert_weights, layer_of, router_logits
from moetrt.schema import MAX_THREADS


def session_options(threads: int | None):
    """The session options every moetrt ORT session uses: all graph optimizations, sequential execution,
    `threads` intra-op threads (None: ORT's default, one per physical core)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: ORT warns about every CastLike it cannot constant-fold
    if threads is not None:
        if not 1 <= threads <= MAX_THREADS:
            raise MoetrtError(f"threads: expected an integer in [1, {MAX_THREADS}], found {threads}")
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def create_session(
    engine_dir: Path,
    threads: int | None,
    device: str = "cpu",
    model: onnx.ModelProto | None = None,
):
    """An InferenceSession over the engine in `engine_dir`.

    `model` replaces the on-disk graph (e.g. one with extra outputs, see `add_graph_outputs`); its external
    weights are still read from `engine_dir`. ORT's load errors are turned into one line naming the file.
    """
    import onnxruntime as ort

    so = session_options(threads)
    path = engine_dir / MODEL_FILE
    if model is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(engine_dir))
        source: str | bytes = model.SerializeToString()
    else:
        source = str(path)
    try:
        return ort.InferenceSession(source, so, providers=providers(device))
    except MoetrtError:
        raise
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types, all with a message
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoetrtError(f"{path}: ONNX Runtime cannot load the engine ({first_line})") from None


def add_graph_outputs(model_path: Path, names: Sequence[str]) -> onnx.ModelProto:
    """The graph at `model_path` (weights left external) with intermediate values `names` declared as
    outputs, so a session can return them (the validation suite reads `layers.{i}.moe_input`,
    `layers.{i}.router_logits`, `layers.{i}.moe_output`). `layers.{i}.expert_ids` / `expert_weights` are
    made on request by one call of the engine's routing function (`moetrt.names.ROUTE_FUNCTION`) on the
    layer's router logits, so an engine whose routing nobody asks for runs no routing ops. Unknown names
    are refused."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    produced = {out: node for node in graph.node for out in node.output}
    declared = {out.name for out in graph.output}
    infos = {vi.name: vi for vi in graph.value_info}
    for name in names:
        if name in declared:
            continue
        if name not in produced and _is_routing_value(name):
            call = _add_route_call(model, model_path, layer_of(name))
            produced.update(dict.fromkeys(call.output, call))
        if name not in produced:
            raise MoetrtError(f"{model_path}: no value named {name!r} to add as an output")
        if name in infos:
            graph.output.append(infos[name])
        else:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


def _is_routing_value(name: str) -> bool:
    try:
        layer = layer_of(name)
    except ValueError:
        return False
    return name in (expert_ids(layer), expert_weights(layer))


def _add_route_call(model: onnx.ModelProto, model_path: Path, layer: int) -> onnx.NodeProto:
    """Append `ROUTE_FUNCTION(router_logits(layer)) -> expert_ids(layer), expert_weights(layer)`."""
    domain, name = ROUTE_FUNCTION
    if not any((f.domain, f.name) == ROUTE_FUNCTION for f in model.functions):
        raise MoetrtError(f"{model_path}: the engine has no routing function {domain}::{name}; rebuild it to get "
                          "expert_ids / expert_weights")  # fmt: skip
    node = onnx.helper.make_node(
        name, [router_logits(layer)], [expert_ids(layer), expert_weights(layer)], name=f"layers.{layer}.route",
        domain=domain,
    )  # fmt: skip
    model.graph.node.append(node)
    return node
