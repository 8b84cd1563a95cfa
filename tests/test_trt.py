"""The TensorRT path: the TensorRT-bound graph contract, the AOT lowering, the plugin/contract agreement, and
clear errors without TensorRT. Building and running engines needs TensorRT and a GPU (skipped otherwise).

The lowering test runs the lowered chain node by node through the Triton stage launchers (in triton's
interpreter without CUDA, as in test_kernels.py), which checks the wiring and the fields TensorRT would see.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported; see test_kernels.py

from moetrt.engines import trt as trt_engine  # noqa: E402
from moetrt.errors import MoetrtError  # noqa: E402
from moetrt.model.mixtral import sparse_moe  # noqa: E402
from moetrt.plugins import contract, ptx, trt_moe  # noqa: E402
from moetrt.plugins.kernels import geometry  # noqa: E402

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except Exception:  # missing, or bindings without libnvinfer (ImportError/OSError)
    HAVE_TRT = False
H, F, E, K = 32, 64, 8, 2


def moe_model(layers: int = 2, tokens: int | str = "T", dtype=np.float32, seed: int = 0, **attr_overrides):
    """x -> TopKMoE -> ... -> y with random weights as initializers (opset 20 + the moetrt domain)."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        names = [f"l{i}.router", f"l{i}.w1", f"l{i}.w3", f"l{i}.w2"]
        for name, shape in zip(names, [(E, H), (E, F, H), (E, F, H), (E, H, F)], strict=True):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(dtype), name))
        attrs = {**contract.node_attributes(K), **attr_overrides}
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node(contract.OP_TYPE, [prev, *names], [out], name=f"moe{i}",
                                      domain=contract.DOMAIN, **attrs))  # fmt: skip
        prev = out
    graph = helper.make_graph(
        nodes, "moe", [helper.make_tensor_value_info("x", elem, [tokens, H])],
        [helper.make_tensor_value_info("y", elem, [tokens, H])], initializer=inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(contract.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_plugin_fields_agree_with_the_contract():
    """The parser consumes plugin_namespace/plugin_version for the lookup; every other attribute is a field."""
    assert set(contract.node_attributes(K)) == set(trt_moe.TOPK_MOE_FIELDS) | set(trt_moe.PARSER_KEYS)
    assert set(trt_moe.TOPK_MOE_FIELDS).isdisjoint(trt_moe.PARSER_KEYS)
    assert (contract.PLUGIN_VERSION, contract.PLUGIN_NAMESPACE) == ("1", "moetrt")  # a tensorrt.plugin is version "1"


def test_stage_ops_match_the_kernels_launch_order():
    """Each AOT stage plugin's (inputs, outputs) are its kernel's pointer parameters around the int32 T."""
    for op in trt_moe.STAGE_OPS:
        names = [name for name, _ in ptx.SIGNATURES[op.stage]]
        assert names == [f"{n}_ptr" for n in op.inputs] + ["T"] + [f"{n}_ptr" for n in op.outputs], op
    assert [op.stage for op in trt_moe.STAGE_OPS] == list(geometry.STAGES)


def test_check_accepts_the_contract_graph():
    nodes = trt_engine.check_trt_graph(moe_model(layers=3))
    assert [n.name for n in nodes] == ["moe0", "moe1", "moe2"]


def test_check_rejects_a_local_function_shadowing_the_plugin():
    model = moe_model()
    body = helper.make_node("Identity", ["hidden"], ["output"])
    model.functions.append(helper.make_function(
        contract.DOMAIN, contract.OP_TYPE, ["hidden", "router_weight", "w1", "w3", "w2"], ["output"], [body],
        [helper.make_opsetid("", 20)], attributes=list(contract.node_attributes(K)),
    ))  # fmt: skip
    with pytest.raises(MoetrtError, match="local function moetrt::TopKMoE"):
        trt_engine.check_trt_graph(model)


@pytest.mark.parametrize("overrides,message", [
    ({"aot": 1}, "attributes"),
    ({"plugin_namespace": "sample"}, "plugin_namespace is 'sample'"),
    ({"plugin_version": "2"}, "plugin_version is '2'"),
    ({"top_k": 2.0}, "attribute top_k is an ONNX"),
    ({"normalize": 3}, "out of range"),
])  # fmt: skip
def test_check_rejects_attributes_off_the_contract(overrides, message):
    with pytest.raises(MoetrtError, match=message):
        trt_engine.check_trt_graph(moe_model(**overrides))


def test_check_rejects_a_missing_attribute():
    model = moe_model(layers=1)
    del model.graph.node[0].attribute[-1]
    with pytest.raises(MoetrtError, match="the contract requires"):
        trt_engine.check_trt_graph(model)


def test_lowering_replaces_each_node_with_the_stage_chain():
    model = moe_model(layers=2)
    lowered = trt_engine.lower_for_aot(model)
    ops = [n.op_type for n in lowered.graph.node]
    assert ops == [op.op_type for op in trt_moe.STAGE_OPS] * 2 and contract.OP_TYPE not in ops
    assert lowered.graph.node[-1].output == ["y"] and lowered.graph.node[4].output == ["h0"]
    known = {"x"} | {i.name for i in lowered.graph.initializer}
    for node in lowered.graph.node:  # topological, and every node is bindable by the parser
        assert set(node.input) <= known, node.name
        known |= set(node.output)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert set(attrs) == set(trt_moe.STAGE_FIELDS) | set(trt_moe.PARSER_KEYS)
        assert attrs["plugin_namespace"] == b"moetrt" and attrs["plugin_version"] == b"1"
        assert (attrs["hidden_size"], attrs["intermediate_size"], attrs["num_experts"], attrs["top_k"]) == (H, F, E, K)
        assert attrs["normalize"] == 1 and attrs["block_m"] == geometry.BLOCK_M
    assert len(model.graph.node) == 2  # the input is untouched


def run_lowered(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    """Execute a lowered graph with the Triton stage launchers: what the AOT plugins' kernels compute."""
    from moetrt.plugins.kernels.align import Alignment, align
    from moetrt.plugins.kernels.combine import combine
    from moetrt.plugins.kernels.expert_gemm import expert_gemm1, expert_gemm2
    from moetrt.plugins.kernels.routing import route

    env = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()).to(x.device) for i in model.graph.initializer}
    env["x"] = x
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dims = geometry.MoeDims(*(int(attrs[f]) for f in trt_moe.STAGE_FIELDS))
        args = [env[n] for n in node.input]
        if node.op_type == "TopKMoERoute":
            outs = route(*args, dims)
        elif node.op_type == "TopKMoEAlign":
            outs = align(*args, dims)
        elif node.op_type == "TopKMoEGemm1":
            outs = (expert_gemm1(*args[:3], Alignment(torch.empty(0), args[5], args[3], args[4]), dims),)
        elif node.op_type == "TopKMoEGemm2":
            tokens = (args[2].shape[0] - dims.num_experts * (dims.block_m - 1)) // dims.top_k  # rows_bound -> T
            al = Alignment(torch.empty(0), args[4], args[2], args[3])
            outs = (expert_gemm2(args[0], args[1], al, tokens, dims),)
        else:
            outs = (combine(*args, dims),)
        env.update(zip(node.output, outs, strict=True))
    return env["y"]


def test_lowered_chain_computes_the_op():
    model = moe_model(layers=2, seed=1)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((7, H)).astype(np.float32) * 0.5)
    x = x.to("cuda" if CUDA else "cpu")
    got = run_lowered(trt_engine.lower_for_aot(model), x)
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()).to(x.device) for i in model.graph.initializer}
    ref = x
    for layer in range(2):
        ref = sparse_moe(ref, *(weights[f"l{layer}.{n}"] for n in ("router", "w1", "w3", "w2")), K)
    err = (got - ref).abs().max().item()
    assert err <= 2e-6 * ref.abs().max().item(), err


def test_profiles_cover_prefill_and_decode():
    p = trt_engine.profiles(max_batch=4, max_seq_len=512)
    assert p["prefill"] == {"batch": [1, 4, 4], "seq": [1, 128, 512]}
    assert p["decode"] == {"batch": [1, 4, 4], "seq": [1, 1, 1]}
    shapes = trt_engine._input_shapes("past_key.0", (-1, 8, 512, 128), p["decode"])
    assert shapes == [(1, 8, 512, 128), (4, 8, 512, 128), (4, 8, 512, 128)]
    with pytest.raises(MoetrtError, match="dynamic axis 2"):
        trt_engine._input_shapes("past_key.0", (-1, 8, -1, 128), p["decode"])


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is missing")
def test_build_without_tensorrt_is_a_clear_error(tmp_path):
    with pytest.raises(MoetrtError) as err:
        trt_engine.build_trt_engine(tmp_path / "export", tmp_path / "engine", precision="fp16")
    assert str(err.value) == (
        "TensorRT is not installed: pip install 'moetrt[trt]' (TensorRT with a CUDA GPU) to build or run TensorRT "
        "engines"
    )
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is missing")
def test_backend_and_plugin_without_tensorrt_are_clear_errors(tmp_path):
    from moetrt.runtime.trt_backend import TrtBackend

    with pytest.raises(MoetrtError, match="TensorRT is not installed"):
        TrtBackend.load(tmp_path)
    with pytest.raises(MoetrtError, match="TensorRT is not installed"):
        trt_moe.register_plugin()


# ---- TensorRT + GPU ---------------------------------------------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT (pip install 'moetrt[trt]')")
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("plugins", ["aot", "jit"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_engine_matches_sparse_moe(tmp_path, plugins, dtype):
    import tensorrt as trt

    model = moe_model(layers=2, dtype=dtype, seed=3)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = trt_engine.parse_network(trt, builder, logger, path, plugins)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, H), (16, H), (64, H))
    config.add_optimization_profile(profile)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()

    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()).cuda() for i in model.graph.initializer}
    for tokens in (1, 7, 64):
        x = (torch.randn(tokens, H) * 0.5).to(getattr(torch, np.dtype(dtype).name)).cuda()
        y = torch.empty_like(x)
        context.set_input_shape("x", tuple(x.shape))
        context.set_tensor_address("x", x.data_ptr())
        context.set_tensor_address("y", y.data_ptr())
        stream = torch.cuda.current_stream()
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        ref = x
        for layer in range(2):
            ref = sparse_moe(ref, *(weights[f"l{layer}.{n}"] for n in ("router", "w1", "w3", "w2")), K)
        tol = 2e-3 if dtype == np.float16 else 2e-6
        assert (y.float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()
