"""The TensorRT path: the TensorRT-bound graph contract, the AOT lowering, the plugin/contract agreement, the
plugin attributes as TensorRT hands them over, the build's checks and the engine manifest, the version pins,
and clear errors without TensorRT. Building and running engines needs TensorRT and a GPU (skipped otherwise).

The lowering test runs the lowered chain node by node through the Triton stage launchers (in triton's
interpreter without CUDA, as in test_kernels.py), which checks the wiring and the fields TensorRT would see.

TensorRT cannot be installed here, so the plugin-attribute tests call moetrt's registration functions with a
recorder in place of `tensorrt.plugin` and feed them attributes exactly as TensorRT would: the ONNX parser's
PluginFields (an INT attribute -> INT32, length 1; the bindings' `PluginField.data` is then a numpy array of
shape (1,)) converted by the rule of `tensorrt.plugin`'s `_TemplatePluginCreator.create_plugin` (TensorRT
10.9 to 11.1), with every warning an error: NumPy 1.25-2.3 warn where NumPy >= 2.4 raises.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import typing
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported; see test_kernels.py

from moetrt import names  # noqa: E402
from moetrt.artifacts import write_manifest  # noqa: E402
from moetrt.engines import trt as trt_engine  # noqa: E402
from moetrt.errors import MoetrtError  # noqa: E402
from moetrt.model.config import PRESETS  # noqa: E402
from moetrt.model.mixtral import sparse_moe  # noqa: E402
from moetrt.plugins import contract, ptx, trt_moe  # noqa: E402
from moetrt.plugins.kernels import geometry  # noqa: E402
from moetrt.registry import TENSORRT_MISSING  # noqa: E402

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


def run_lowered(model: onnx.ModelProto, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Execute a lowered graph with the Triton stage launchers (what the AOT plugins' kernels compute); every
    value by name."""
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
    return env


def test_lowered_chain_computes_the_op():
    model = moe_model(layers=2, seed=1)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((7, H)).astype(np.float32) * 0.5)
    x = x.to("cuda" if CUDA else "cpu")
    got = run_lowered(trt_engine.lower_for_aot(model), x)["y"]
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()).to(x.device) for i in model.graph.initializer}
    ref = x
    for layer in range(2):
        ref = sparse_moe(ref, *(weights[f"l{layer}.{n}"] for n in ("router", "w1", "w3", "w2")), K)
    err = (got - ref).abs().max().item()
    assert err <= 2e-6 * ref.abs().max().item(), err


def test_profiles_cover_prefill_and_decode():
    p = trt_engine.profiles(max_batch=4, max_seq_len=512)
    assert p["prefill"] == {"batch": [1, 4, 4], "seq": [1, 128, 512], "live": [1, 128, 512]}
    assert p["decode"] == {"batch": [1, 4, 4], "seq": [1, 1, 1], "live": [1, 512, 512]}
    shapes = trt_engine._input_shapes("past_key.0", (-1, 8, 512, 128), p["decode"])
    assert shapes == [(1, 8, 512, 128), (4, 8, 512, 128), (4, 8, 512, 128)]
    assert trt_engine._input_shapes(names.KV_LIVE, (-1,), p["prefill"]) == [(1,), (128,), (512,)]
    with pytest.raises(MoetrtError, match="dynamic axis 2"):
        trt_engine._input_shapes("past_key.0", (-1, 8, -1, 128), p["decode"])


# ---- plugin attributes as TensorRT hands them over ---------------------------------------------------------


class PluginRecorder:
    """Stands in for `tensorrt.plugin`: keeps the functions moetrt registers. Its descriptors carry plain int
    shapes where TensorRT's carry symbolic expressions with the same arithmetic."""

    class TensorDesc:
        def __init__(self, shape, dtype):
            self.shape_expr, self.dtype = tuple(shape), dtype

        def like(self):
            return type(self)(self.shape_expr, self.dtype)

    class SymIntExprs(tuple):
        from_tuple = classmethod(lambda cls, values: cls(values))

    SymInt32 = int
    KernelLaunchParams = SimpleNamespace

    def __init__(self):
        self.descs, self.impls, self.aot_impls = {}, {}, {}

    def from_shape_expr(self, shape, dtype):
        return self.TensorDesc(shape, dtype)

    def register(self, plugin_id):
        return lambda fn: self.descs.setdefault(plugin_id, fn)

    def impl(self, plugin_id):
        return lambda fn: self.impls.setdefault(plugin_id, fn)

    def aot_impl(self, plugin_id):
        return lambda fn: self.aot_impls.setdefault(plugin_id, fn)


FAKE_TRT = SimpleNamespace(float32="float32", float16="float16", bfloat16="bfloat16", int32="int32")
# tensorrt.plugin `_validate.SERIALIZABLE_NP_DTYPES`: the numpy dtypes an NDArray attribute may declare.
SERIALIZABLE_NP_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, bool, np.bool_)


def parser_field(attr: onnx.AttributeProto) -> np.ndarray:
    """`PluginField.data` of the field onnx-tensorrt's `loadFields` makes from an ONNX INT attribute: type
    INT32, length 1, which the bindings return as `py::array(length, int32_t*)`."""
    assert attr.type == onnx.AttributeProto.INT, attr
    return np.array([attr.i], dtype=np.int32)


def trt_attribute(data: np.ndarray, annotation) -> object:
    """`_TemplatePluginCreator.create_plugin`'s conversion of a field's data to the declared attribute."""
    if typing.get_origin(annotation) is np.ndarray:
        return data.astype(typing.get_args(typing.get_args(annotation)[1])[0])
    if issubclass(annotation, str):
        return data.tobytes().decode("utf-8")
    return annotation(data)


def declared_attributes(register_fn, n_inputs: int) -> dict:
    """The attribute annotations of a register function, checked as `_parse_register_inputs` checks them."""
    params = list(inspect.signature(register_fn).parameters.values())[n_inputs:]
    for param in params:
        assert typing.get_origin(param.annotation) is np.ndarray, (register_fn.__name__, param)
        assert typing.get_args(typing.get_args(param.annotation)[1])[0] in SERIALIZABLE_NP_DTYPES
    return {param.name: param.annotation for param in params}


def test_an_int_annotation_would_fail_under_numpy_2_4():
    """The control: the conversion TensorRT applies to an `int` attribute is refused (NumPy < 2.4 warns)."""
    with warnings.catch_warnings(), pytest.raises((DeprecationWarning, TypeError)):
        warnings.simplefilter("error")
        trt_attribute(np.array([2], dtype=np.int32), int)


def test_stage_plugin_attributes_as_the_parser_passes_them(monkeypatch):
    """Every stage plugin of a lowered node gets its attributes as int32 arrays of shape (1,) and turns them
    into the layer's dims: the register functions give the same shapes the Triton launchers produce, and the
    aot_impl functions compile the right stage for the right dims and launch it over T."""
    recorder = PluginRecorder()
    trt_moe._register_stages(FAKE_TRT, recorder)
    compiled = []

    def compile_stage(stage, dims, dtype, cc):
        compiled.append((stage, dims, dtype, cc))
        return ptx.CompiledStage(stage, dims, dtype, cc, f"{stage}_kernel", "", 4, 0, ())

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ptx, "compile_stage", compile_stage)
    model = trt_engine.lower_for_aot(moe_model(layers=1))
    tokens = 7
    real = run_lowered(model, torch.zeros(tokens, H))  # the launchers' shapes for the same graph
    env = {name: recorder.TensorDesc(tensor.shape, "float32") for name, tensor in real.items()}
    dims = geometry.MoeDims(H, F, E, K)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for node, op in zip(model.graph.node, trt_moe.STAGE_OPS, strict=True):
            declared = declared_attributes(recorder.descs[op.plugin_id], len(op.inputs))
            assert tuple(declared) == trt_moe.STAGE_FIELDS
            fields = {a.name: a for a in node.attribute}
            attrs = {name: trt_attribute(parser_field(fields[name]), ann) for name, ann in declared.items()}
            assert all(a.shape == (1,) and a.dtype == np.int32 for a in attrs.values())
            inputs = [env[name] for name in node.input]
            outs = recorder.descs[op.plugin_id](*inputs, **attrs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            assert [o.shape_expr for o in outs] == [tuple(real[name].shape) for name in node.output], op
            name, _, launch, extra = recorder.aot_impls[op.plugin_id](*inputs, *attrs.values(), outs, 0)
            assert name == f"{op.stage}_kernel" and extra == (tokens,)
            assert (launch.grid_x, launch.grid_y, launch.grid_z) == geometry.grid(op.stage, dims, tokens)
            assert launch.block_x == 128
    dtypes = ["float32"] * len(trt_moe.STAGE_OPS)
    assert compiled == [(op.stage, dims, dtype, 90) for op, dtype in zip(trt_moe.STAGE_OPS, dtypes, strict=True)]


def test_jit_plugin_attributes_survive_parsing_and_engine_serialization():
    """Parse time: fields from the ONNX node. Deserialization: the fields `get_fields_to_serialize` wrote for
    each array attribute (its own dtype, here INT32) come back through the same conversion."""
    recorder = PluginRecorder()
    trt_moe._register_jit(FAKE_TRT, recorder)
    plugin_id = f"{contract.PLUGIN_NAMESPACE}::{contract.OP_TYPE}"
    desc = recorder.descs[plugin_id]
    declared = declared_attributes(desc, len(contract.INPUTS))
    assert tuple(declared) == trt_moe.TOPK_MOE_FIELDS
    node = moe_model(layers=1).graph.node[0]
    fields = {a.name: a for a in node.attribute}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parsed = {name: trt_attribute(parser_field(fields[name]), ann) for name, ann in declared.items()}
        restored = {name: trt_attribute(np.array(value, dtype=value.dtype), declared[name])
                    for name, value in parsed.items()}  # fmt: skip
        hidden = recorder.TensorDesc((5, H), "float16")
        out = desc(hidden, *(recorder.TensorDesc((1,), "float16") for _ in range(4)), **restored)
        assert (trt_moe.scalar(restored["top_k"]), trt_moe.scalar(restored["normalize"])) == (K, 1)
    assert (out.shape_expr, out.dtype) == ((5, H), "float16")
    impl_params = inspect.signature(recorder.impls[plugin_id]).parameters
    assert list(impl_params) == [*contract.INPUTS, *trt_moe.TOPK_MOE_FIELDS, "outputs", "stream"]
    with pytest.raises(ValueError, match="1-element"):
        trt_moe.scalar(np.array(2, dtype=np.int32))


# tensorrt.plugin's public names in TensorRT 10.8 and 10.9 (`@public_api` in its _lib, _tensor, _top_level).
API_10_8 = ("register", "impl", "autotune", "TensorDesc", "Tensor", "from_shape_expr", "AutoTuneCombination")
API_10_9 = (*API_10_8, "aot_impl", "KernelLaunchParams", "SymIntExprs", "SymInt32")


def test_registration_checks_only_the_api_of_the_mode():
    before_aot, after_aot = SimpleNamespace(**dict.fromkeys(API_10_8)), SimpleNamespace(**dict.fromkeys(API_10_9))
    assert trt_moe.missing_api(before_aot, "jit") == [] and trt_moe.missing_api(after_aot, "aot") == []
    assert trt_moe.missing_api(before_aot, "aot") == ["aot_impl", "KernelLaunchParams", "SymIntExprs", "SymInt32"]
    with pytest.raises(MoetrtError, match="plugins: expected one of aot, jit, found 'both'"):
        trt_moe.register_plugin("both")


def test_pins_in_pyproject_are_the_versions_the_code_needs():
    """tensorrt >= 10.9 (aot_impl), triton >= 3.3 (ASTSource(constexprs=...)), torch >= 2.7 (torch 2.6 pins
    triton 3.2) in the `trt` extra; the `dev` extra's triton too (tests/test_ptx.py compiles with it)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    trt = {req.name: req.specifier for req in map(Requirement, extras["trt"])}
    dev = {req.name: req.specifier for req in map(Requirement, extras["dev"])}
    floors = {
        "tensorrt": (trt_moe.MIN_TENSORRT, "10.8.0.43"),
        "triton": ("3.3.0", "3.2.0"),
        "torch": ("2.7.0", "2.6.0"),
    }
    for name, (floor, below) in floors.items():
        assert Version(floor) in trt[name] and Version(below) not in trt[name], (name, trt[name])
    assert Version("3.3.0") in dev["triton"] and Version("3.2.0") not in dev["triton"]


# ---- the build's checks and the graph TensorRT parses ------------------------------------------------------


# ---- attention bounded by the live length (pure ONNX, run in ONNX Runtime) ---------------------------------

BOUND_SEQ = 48
BOUND_CONFIGS = {"tiny": {}, "sliding_window_6": {"sliding_window": 6}}


@pytest.fixture(scope="module", params=list(BOUND_CONFIGS))
def fp32_export(request, tmp_path_factory) -> Path:
    import dataclasses

    from moetrt.export import export_checkpoint
    from moetrt.model.testing import make_checkpoint

    root = tmp_path_factory.mktemp(f"bound-{request.param}")
    config = dataclasses.replace(PRESETS["tiny"], **BOUND_CONFIGS[request.param])
    ckpt = make_checkpoint(root / "ckpt", config, seed=2)
    return Path(export_checkpoint(ckpt, root / "export", max_seq_len=BOUND_SEQ, max_batch=2, progress=False))


def test_bounded_attention_computes_the_exports_attention(fp32_export):
    """The export and its `bound_attention` rewrite in ONNX Runtime, on random caches: prefill from 0, rows at
    different lengths (a chunk after a past), decode. With `kv_live` of the live length (or longer, up to
    the capacity) logits and new K/V agree within fp32 summation-order noise (1.2e-5 - 1.6e-5 measured on
    logits); one slot short, they do not: the rewrite really cuts what attention reads."""
    import onnxruntime as ort

    from moetrt.engines.trt_attention import bound_attention
    from moetrt.export import with_reference_function

    exported = onnx.load(fp32_export / names.MODEL_FILE, load_external_data=False)
    layers = PRESETS["tiny"].num_hidden_layers
    bounded = onnx.ModelProto()
    bounded.CopyFrom(exported)
    bound_attention(bounded, layers, BOUND_SEQ)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(fp32_export))

    def session(model):
        return ort.InferenceSession(with_reference_function(model).SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])  # fmt: skip

    reference, candidate = session(exported), session(bounded)
    config, rng = PRESETS["tiny"], np.random.default_rng(0)
    shape = (2, config.num_key_value_heads, BOUND_SEQ, config.head_dim)
    caches = {name(i): rng.standard_normal(shape).astype(np.float32)
              for i in range(layers) for name in (names.past_key, names.past_value)}  # fmt: skip
    steps = {"prefill": [[0, 1, 2, 3], [0, 1, 2, 3]], "chunk": [[5, 6, 7], [20, 21, 22]], "decode": [[9], [40]]}
    for step, positions in steps.items():
        pos = np.array(positions)
        feeds = {names.INPUT_IDS: rng.integers(3, config.vocab_size, size=pos.shape), names.POSITION_IDS: pos,
                 **caches}  # fmt: skip
        expected = reference.run(None, feeds)
        live = max(1, int(pos[:, 0].max()))
        for slots in (live, (live + BOUND_SEQ) // 2, BOUND_SEQ):
            got = candidate.run(None, {**feeds, names.KV_LIVE: np.zeros(slots, np.int32)})
            for name, a, b in zip([o.name for o in reference.get_outputs()], expected, got, strict=True):
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4, err_msg=f"{step}, {slots} slots: {name}")
        if live > 1:
            short = candidate.run(None, {**feeds, names.KV_LIVE: np.zeros(live - 1, np.int32)})
            assert np.abs(short[0] - expected[0]).max() > 1e-2, f"{step}: one slot short changed nothing"


def test_bounded_attention_refuses_another_pattern(fp32_export):
    """A graph whose key-position Range is not the capacity (a future exporter's pattern) is refused in one
    line and left as it was, and so is a graph bounded twice."""
    from moetrt.engines.trt_attention import bound_attention

    exported = onnx.load(fp32_export / names.MODEL_FILE, load_external_data=False)
    layers = PRESETS["tiny"].num_hidden_layers
    before = exported.SerializeToString()
    with pytest.raises(MoetrtError, match=r"found 0 Range\(0, 47\) nodes, expected 1"):
        bound_attention(exported, layers, BOUND_SEQ - 1)
    assert exported.SerializeToString() == before, "a refused graph was changed"
    bound_attention(exported, layers, BOUND_SEQ)
    with pytest.raises(MoetrtError, match="bounded already"):
        bound_attention(exported, layers, BOUND_SEQ)


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    """A tiny float16 checkpoint and its export (max_batch 2, max_seq_len 32)."""
    from moetrt.export import export_checkpoint
    from moetrt.model.testing import make_checkpoint

    root = tmp_path_factory.mktemp("trt")
    ckpt = make_checkpoint(root / "ckpt", PRESETS["tiny"], seed=0)
    export = export_checkpoint(ckpt, root / "export", max_seq_len=32, max_batch=2, dtype="float16", progress=False)
    return SimpleNamespace(checkpoint=ckpt, export=Path(export))


def test_build_is_refused_before_tensorrt_is_needed(fp16_export, tmp_path):
    """The ORT build's checks, then the TensorRT-specific ones, all without importing tensorrt."""
    export = fp16_export.export
    graph_only = shutil.copytree(export, tmp_path / "graph-only")
    manifest = json.loads((graph_only / names.MANIFEST).read_text())
    (graph_only / names.MANIFEST).write_text(json.dumps({**manifest, "weights": False}))
    (tmp_path / "a-file").write_text("keep me")
    cases = [
        ((export, export), {}, "must differ from the export directory"),
        ((export, tmp_path / "a-file"), {}, "exists and is not a moetrt artifact"),
        ((tmp_path / "nothing", tmp_path / "e"), {}, "expected a moetrt export"),
        ((graph_only, tmp_path / "e"), {}, "a graph-only export"),
        ((export, tmp_path / "e"), {"precision": "bf16"}, "the export is float16"),
        ((export, tmp_path / "e"), {"device": "cpu"}, "device: TensorRT engines are built for and run on a CUDA"),
        ((export, tmp_path / "e"), {"plugins": "both"}, "plugins: expected one of aot, jit"),
        ((export, tmp_path / "e"), {"max_batch": 3}, r"max_batch: 3 is outside \[1, 2\]"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(MoetrtError, match=message):
            trt_engine.build_trt_engine(*args, **kwargs)
    assert (tmp_path / "a-file").read_text() == "keep me" and not (tmp_path / "e").exists()
    if not HAVE_TRT:
        with pytest.raises(MoetrtError, match="TensorRT is not installed"):
            trt_engine.build_trt_engine(export, tmp_path / "e", "fp16", threads=2, device="cuda")
        assert not (tmp_path / "e").exists()


def test_cli_build_into_the_export_is_refused(fp16_export):
    """`moetrt build EXPORT --backend trt -o EXPORT`: one line, exit 2, the export untouched."""
    import subprocess
    import sys

    export = fp16_export.export
    before = sorted(p.name for p in export.iterdir())
    cmd = [sys.executable, "-m", "moetrt", "build", str(export), "--backend", "trt", "-o", str(export)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("the output directory must differ from the export directory")
    assert sorted(p.name for p in export.iterdir()) == before


@pytest.mark.parametrize("plugins", ["aot", "jit"])
def test_prepare_graph_marks_each_layers_values_as_outputs(fp16_export, plugins):
    model_path = fp16_export.export / names.MODEL_FILE
    exported = onnx.load(model_path, load_external_data=False)
    model, outputs = trt_engine.prepare_graph(model_path, plugins, "float16")
    assert [i.name for i in model.graph.input] == [i.name for i in exported.graph.input] + [names.KV_LIVE]
    assert outputs == [names.moe_input(0), names.moe_output(0), names.moe_input(1), names.moe_output(1)]
    kept = [o.name for o in exported.graph.output]
    assert [o.name for o in model.graph.output] == kept + outputs
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in model.graph.output[len(kept) :])
    produced = {value for node in model.graph.node for value in node.output}
    assert set(outputs) <= produced
    moe_nodes = [n for n in model.graph.node if n.op_type == contract.OP_TYPE]
    assert len(moe_nodes) == (0 if plugins == "aot" else 2)
    assert trt_engine.prepare_graph(model_path, plugins, "float16", layer_outputs=False)[1] == []
    with pytest.raises(MoetrtError, match="expected layers.<i>.moe_input -> layers.<i>.moe_output"):
        trt_engine.layer_output_names(moe_model(layers=1))


def engine_dir(
    root: Path, plugins: str = "aot", layer_outputs: tuple[str, ...] = (), attention: str | None = names.KV_LIVE
) -> Path:
    """An engine directory as `build_trt_engine` writes it, with an empty engine file (none can be built here);
    attention=None: as an engine built before the `kv_live` input."""
    root.mkdir()
    config = PRESETS["tiny"]
    body = {"backend": "trt", "config": config.to_dict(), "dtype": "float16", "precision": "fp16", "max_batch": 2,
            "max_seq_len": 32, "io": {}, "parent": "0" * 64, "plugins": plugins,
            "layer_outputs": list(layer_outputs), "engine": names.ENGINE_FILE}  # fmt: skip
    if attention is not None:
        body["attention"] = attention
    write_manifest(root, "engine", body)
    (root / names.ENGINE_FILE).write_bytes(b"")
    return root


def test_backend_checks_its_engine_directory(tmp_path):
    from moetrt.runtime.trt_backend import check_engine

    values = (names.moe_input(0), names.moe_output(0))
    engine = engine_dir(tmp_path / "engine", layer_outputs=values)
    manifest, max_batch, extras = check_engine(engine, None, values[1:])
    assert (manifest["plugins"], max_batch, extras) == ("aot", 2, values[1:])
    assert check_engine(engine, 1, ())[1] == 1
    with pytest.raises(MoetrtError, match="'layers.0.router_logits' is not a per-layer output of this TensorRT"):
        check_engine(engine, None, [names.router_logits(0)])
    with pytest.raises(MoetrtError, match="it was built without them"):
        check_engine(engine_dir(tmp_path / "bare"), None, [names.moe_input(0)])
    with pytest.raises(MoetrtError, match=r"max_batch: 3 is outside \[1, 2\]"):
        check_engine(engine, 3, ())
    with pytest.raises(MoetrtError, match="field 'plugins' is 'both'"):
        check_engine(engine_dir(tmp_path / "broken", plugins="both"), None, ())
    with pytest.raises(MoetrtError, match="reads the whole cache .* rebuild it"):
        check_engine(engine_dir(tmp_path / "unbounded", attention=None), None, ())
    (engine / names.ENGINE_FILE).unlink()
    with pytest.raises(MoetrtError, match="model.engine: not found"):
        check_engine(engine, None, ())


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is missing")
def test_backend_and_plugin_without_tensorrt_are_clear_errors(tmp_path):
    from moetrt.runtime.trt_backend import TrtBackend

    engine = engine_dir(tmp_path / "engine", layer_outputs=(names.moe_input(0),))
    with pytest.raises(MoetrtError) as err:
        TrtBackend.load(engine, max_batch=1, threads=2, extra_outputs=[names.moe_input(0)])
    assert str(err.value) == TENSORRT_MISSING
    for mode in trt_engine.PLUGIN_MODES:
        with pytest.raises(MoetrtError, match="TensorRT is not installed"):
            trt_moe.register_plugin(mode)


# ---- TensorRT + GPU ---------------------------------------------------------------------------------------


def needs_trt_gpu(test):
    """The marks of a test that builds and runs TensorRT engines."""
    for mark in (
        pytest.mark.tensorrt,
        pytest.mark.gpu,
        pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT (pip install 'moetrt[trt]')"),
        pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"),
    ):
        test = mark(test)
    return test


@needs_trt_gpu
@pytest.mark.parametrize("plugins", ["aot", "jit"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_engine_matches_sparse_moe(tmp_path, plugins, dtype):
    import tensorrt as trt

    model = moe_model(layers=2, dtype=dtype, seed=3)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    graph, _ = trt_engine.prepare_graph(path, plugins, np.dtype(dtype).name, layer_outputs=False)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = trt_engine.parse_network(trt, builder, logger, graph, path, plugins)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, H), (16, H), (64, H))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, "TensorRT failed to build the engine (see its log)"
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    assert engine is not None, "TensorRT could not deserialize the engine it built"
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()  # not the default stream, where TensorRT adds device-wide synchronizations

    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()).cuda() for i in model.graph.initializer}
    for tokens in (1, 7, 64):
        x = (torch.randn(tokens, H) * 0.5).to(getattr(torch, np.dtype(dtype).name)).cuda()
        y = torch.empty_like(x)
        context.set_input_shape("x", tuple(x.shape))
        context.set_tensor_address("x", x.data_ptr())
        context.set_tensor_address("y", y.data_ptr())
        stream.wait_stream(torch.cuda.current_stream())  # x was made on the current stream
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        ref = x
        for layer in range(2):
            ref = sparse_moe(ref, *(weights[f"l{layer}.{n}"] for n in ("router", "w1", "w3", "w2")), K)
        tol = 2e-3 if dtype == np.float16 else 2e-6
        assert (y.float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()


@needs_trt_gpu
@pytest.mark.parametrize("plugins", ["aot", "jit"])
def test_backend_matches_eager_with_slots_and_layer_values(fp16_export, tmp_path, plugins):
    """A tiny fp16 engine through `TrtBackend`: logits and per-layer values vs the eager model in fp16 on the
    GPU within the validation suite's fp16 tolerances; a decode step on slot 1 alone leaves slot 0 exactly as
    it was; the manifest records the per-layer outputs and, for AOT, the pinned PTX."""
    from moetrt.runtime.eager_backend import EagerBackend
    from moetrt.runtime.trt_backend import TrtBackend
    from moetrt.validate.tolerances import TOLERANCES

    tol = TOLERANCES["fp16"]
    engine = trt_engine.build_trt_engine(fp16_export.export, tmp_path / "engine", plugins=plugins, timing_cache=None)
    manifest = json.loads((engine / names.MANIFEST).read_text())
    values = [names.moe_input(0), names.moe_output(1)]
    assert set(values) <= set(manifest["layer_outputs"])
    assert (manifest["ptx"] is None) == (plugins == "jit")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, PRESETS["tiny"].vocab_size, size=(2, 6))
    pos = np.tile(np.arange(6), (2, 1))
    eager = EagerBackend.from_checkpoint(fp16_export.checkpoint, max_batch=2, max_seq_len=32, dtype="float16",
                                         device="cuda", extra_outputs=values)  # fmt: skip
    with TrtBackend.load(engine, extra_outputs=values) as backend, eager:
        for step_ids, step_pos in ((ids, pos), (ids[:, -1:], pos[:, -1:] + 1)):
            got, want = backend.step(step_ids, step_pos), eager.step(step_ids, step_pos)
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= tol.logits_rel * scale
            for name in values:
                ref = eager.extras[name].astype(np.float32)
                err = np.abs(backend.extras[name].astype(np.float32) - ref).max()
                assert backend.extras[name].shape == ref.shape and err <= tol.state_rel * np.abs(ref).max(), name
        k0, v0 = (c[0].copy() for c in backend.kv_cache(0))
        backend.step(ids[1:, :1], np.array([[7]]), slots=[1])
        k1, v1 = backend.kv_cache(0)
        assert np.array_equal(k1[0], k0) and np.array_equal(v1[0], v0)
        assert not np.array_equal(k1[1, :, 7], np.zeros_like(k1[1, :, 7]))
