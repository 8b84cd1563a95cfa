"""The exporter: graph structure, manifest, numerics against eager, checks, scale, bad input.

Numerics: ONNX Runtime (TopKMoE run through the reference function) vs the eager model, fp32, within
atol = rtol = 1e-4 (observed max error ~1e-5 on logits of magnitude ~6).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from moetrt import artifacts
from moetrt.errors import MoetrtError
from moetrt.export import export_checkpoint, moe_input, moe_output, with_reference_function
from moetrt.export.trace import input_names, output_names
from moetrt.model.checkpoint import CheckpointReader, canonical_shapes, checkpoint_hash, load_model
from moetrt.model.config import PRESETS
from moetrt.model.mixtral import KVCache, sparse_moe
from moetrt.model.testing import make_checkpoint
from moetrt.names import DATA_FILE
from moetrt.plugins import contract

TINY = PRESETS["tiny"]
MAX_SEQ, MAX_BATCH = 32, 2
ATOL = RTOL = 1e-4
BIG_TEST = "test_mixtral_8x7b_graph_on_meta"

# Run in a child process so that its peak RSS is the export's alone. VmHWM, not getrusage's ru_maxrss: Linux
# carries the pre-exec high-water mark into ru_maxrss, so the child would report this test process's RSS.
BIG_EXPORT = textwrap.dedent(
    r"""
    import json, re, sys, time
    from pathlib import Path
    from moetrt.export import export_checkpoint
    from moetrt.model.config import PRESETS
    ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(PRESETS["mixtral-8x7b"].to_hf_dict()))
    start = time.time()
    export_checkpoint(ckpt, out, weights=False)
    hwm_kb = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
    print(json.dumps({"seconds": time.time() - start, "peak_rss": hwm_kb * 1024}))
    """
)


@pytest.fixture(scope="module", autouse=True)
def big_export(request, tmp_path_factory):
    """Start the Mixtral-8x7B graph export first, in the background: it takes minutes of one core, and the
    other tests run beside it."""
    if not any(item.name == BIG_TEST for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("mixtral_8x7b")
    cmd = [sys.executable, "-c", BIG_EXPORT, str(root / "ckpt"), str(root / "export")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, root / "export"
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY, seed=3)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    return export_checkpoint(checkpoint, out, max_seq_len=MAX_SEQ, max_batch=MAX_BATCH)


def moe_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.domain == contract.DOMAIN]


def test_one_topk_moe_node_per_layer(exported):
    proto = onnx.load(exported / "model.onnx", load_external_data=False)
    nodes = moe_nodes(proto)
    assert len(nodes) == TINY.num_hidden_layers
    for i, node in enumerate(nodes):
        moe = f"layers.{i}.block_sparse_moe."
        assert node.op_type == contract.OP_TYPE
        assert list(node.input) == [moe_input(i), moe + "gate.weight", moe + "w1", moe + "w3", moe + "w2"]
        assert list(node.output) == [moe_output(i)]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        assert attrs == contract.node_attributes(TINY.num_experts_per_tok)
    assert not proto.functions
    assert not [n.op_type for n in proto.graph.node if "Sequence" in n.op_type]  # TensorRT parses no sequences
    assert [v.name for v in proto.graph.input] == input_names(TINY)
    assert [v.name for v in proto.graph.output] == output_names(TINY)
    initializers = {t.name: t for t in proto.graph.initializer}
    assert set(initializers) == set(canonical_shapes(TINY))
    for tensor in initializers.values():
        assert tensor.data_location == onnx.TensorProto.EXTERNAL
        assert {e.key: e.value for e in tensor.external_data}["location"] == DATA_FILE


def test_caches_feed_only_views(exported):
    """A cache may reach the attention MatMuls through views only: a Slice or Transpose that ORT does not
    fuse away copies the whole cache every step (see benchmarks/bench_kv_designs.py)."""
    proto = onnx.load(exported / "model.onnx", load_external_data=False)
    caches = set(input_names(TINY)[2:])
    readers = {n.op_type for n in proto.graph.node if caches.intersection(n.input)}
    assert readers <= {"Unsqueeze", "Shape"}, readers


def test_manifest(exported, checkpoint):
    m = artifacts.read_manifest(exported, "export")
    assert m["kind"] == "export" and m["contract_version"] == contract.CONTRACT_VERSION
    assert artifacts.manifest_config(m) == TINY
    assert (m["dtype"], m["max_seq_len"], m["max_batch"], m["weights"]) == ("float32", MAX_SEQ, MAX_BATCH, True)
    assert m["parent"] == checkpoint_hash(checkpoint)
    cache = ["batch", TINY.num_key_value_heads, MAX_SEQ, TINY.head_dim]
    new = ["batch", TINY.num_key_value_heads, "seq", TINY.head_dim]
    assert m["io"]["inputs"]["input_ids"] == {"shape": ["batch", "seq"], "dtype": "int64"}
    assert m["io"]["inputs"]["past_value.1"] == {"shape": cache, "dtype": "float32"}
    assert m["io"]["outputs"]["logits"] == {"shape": ["batch", "seq", TINY.vocab_size], "dtype": "float32"}
    assert m["io"]["outputs"]["new_key.0"] == {"shape": new, "dtype": "float32"}
    assert set(m["io"]["moe"]) == {f(i) for i in range(TINY.num_hidden_layers) for f in (moe_input, moe_output)}


def test_checker_and_strict_shape_inference(exported):
    contract.register_onnx_schema()
    onnx.checker.check_model(str(exported / "model.onnx"))
    proto = onnx.load(exported / "model.onnx", load_external_data=False)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def test_ort_matches_eager_prefill_then_decode(exported, checkpoint):
    proto = with_reference_function(onnx.load(exported / "model.onnx"))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    model = load_model(checkpoint)
    eager_cache = KVCache(TINY, MAX_BATCH, MAX_SEQ, torch.float32)
    shape = (MAX_BATCH, TINY.num_key_value_heads, MAX_SEQ, TINY.head_dim)
    ort_cache = {name: np.zeros(shape, np.float32) for name in input_names(TINY)[2:]}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, TINY.vocab_size, (MAX_BATCH, 7), generator=gen)
    steps = [(prompt, torch.arange(7).repeat(MAX_BATCH, 1)), (prompt[:, :1], torch.full((MAX_BATCH, 1), 7))]
    for ids, pos in steps:
        with torch.no_grad():
            logits, new_k, new_v = model(ids, pos, eager_cache.k, eager_cache.v)
        eager_cache.write(pos, new_k, new_v)
        feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), **ort_cache}
        outs = dict(zip(output_names(TINY), session.run(output_names(TINY), feeds), strict=True))
        np.testing.assert_allclose(outs["logits"], logits.numpy(), atol=ATOL, rtol=RTOL)
        for i in range(TINY.num_hidden_layers):
            for kind, eager in (("key", new_k[i]), ("value", new_v[i])):
                new = outs[f"new_{kind}.{i}"]
                np.testing.assert_allclose(new, eager.numpy(), atol=ATOL, rtol=RTOL)
                ort_cache[f"past_{kind}.{i}"][:, :, pos[0].numpy()] = new  # rows share positions here


@pytest.mark.parametrize(
    ("top_k", "normalize", "zero_router"),
    [(1, True, False), (2, True, False), (3, False, False), (1, True, True), (2, True, True)],
)
def test_reference_function_matches_sparse_moe(top_k, normalize, zero_router):
    """Including a zeroed router: every expert exactly tied, which the contract breaks to the higher index."""
    t, h, f, e = 9, 16, 24, 4
    gen = torch.Generator().manual_seed(top_k)
    args = [torch.randn(s, generator=gen) for s in ((t, h), (e, h), (e, f, h), (e, f, h), (e, h, f))]
    if zero_router:
        args[1].zero_()
    feeds = dict(zip(contract.INPUTS, args, strict=True))
    node = helper.make_node(
        contract.OP_TYPE, list(contract.INPUTS), ["output"], domain=contract.DOMAIN,
        **contract.node_attributes(top_k, normalize),
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "moe",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, a.shape) for n, a in feeds.items()],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, (t, h))],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(contract.DOMAIN, 1)]
    proto = with_reference_function(helper.make_model(graph, opset_imports=opsets))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {n: a.numpy() for n, a in feeds.items()})
    np.testing.assert_allclose(out, sparse_moe(*args, top_k, normalize).numpy(), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_exported_as_bfloat16(tmp_path):
    config = dataclasses.replace(TINY, num_hidden_layers=1, tie_word_embeddings=True)
    ckpt = make_checkpoint(tmp_path / "ckpt", config, seed=1)
    lines = []
    out = export_checkpoint(ckpt, tmp_path / "out", max_seq_len=16, dtype="bf16", notice=lines.append)
    # said before the export: ONNX Runtime's CPU engines need float32, TensorRT builds bf16
    assert len(lines) == 1 and "bfloat16 export builds into trt bf16" in lines[0]
    assert "ort needs a float32 export" in lines[0]
    proto = onnx.load(out / "model.onnx")
    initializers = {t.name: t for t in proto.graph.initializer}
    assert set(initializers) == set(canonical_shapes(config))  # no lm_head.weight: it is embed_tokens.weight
    embed = initializers["embed_tokens.weight"]
    assert embed.data_type == onnx.TensorProto.BFLOAT16
    with CheckpointReader(ckpt) as reader:
        expected = reader.get("embed_tokens.weight").to(torch.bfloat16).view(torch.uint16).numpy()
    assert np.array_equal(np.frombuffer(embed.raw_data, np.uint16).reshape(expected.shape), expected)
    m = artifacts.read_manifest(out, "export")
    assert m["dtype"] == "bfloat16"
    assert m["io"]["outputs"]["logits"]["dtype"] == "bfloat16"
    assert m["io"]["inputs"]["past_key.0"]["dtype"] == "bfloat16"


def assert_one_line_error(excinfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def assert_no_output(out) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_bad_inputs(checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MoetrtError) as excinfo:
        export_checkpoint(checkpoint, out, dtype="int8")
    assert_one_line_error(excinfo, "dtype", "int8")
    with pytest.raises(MoetrtError) as excinfo:
        export_checkpoint(checkpoint, out, max_seq_len=TINY.max_position_embeddings + 1)
    assert_one_line_error(excinfo, "max_seq_len", "max_position_embeddings")
    with pytest.raises(MoetrtError) as excinfo:
        export_checkpoint(checkpoint, out, max_batch=0)
    assert_one_line_error(excinfo, "max_batch")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({**TINY.to_hf_dict(), "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(MoetrtError) as excinfo:
        export_checkpoint(llama, out, weights=False)
    assert_one_line_error(excinfo, "architectures", "Mixtral")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(MoetrtError) as excinfo:
        export_checkpoint(checkpoint, blocker / "out")
    assert_one_line_error(excinfo, "cannot write")
    with pytest.raises(MoetrtError) as excinfo:
        export_checkpoint(checkpoint, checkpoint.parent)  # would replace the checkpoint's parent
    assert_one_line_error(excinfo, "not a moetrt artifact")
    assert_no_output(out)


def test_failure_leaves_no_partial_output(checkpoint, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr("moetrt.export.exporter.trace", fail)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        export_checkpoint(checkpoint, out)
    assert_no_output(out)


def test_read_manifest_refusals(exported, tmp_path):
    good = json.loads((exported / artifacts.MANIFEST).read_text())
    cases = {
        "missing": None,
        "corrupt": "{not json",
        "wrong kind": json.dumps({**good, "kind": "engine"}),
        "other moetrt": json.dumps({**good, "moetrt_version": "0.0.1"}),
        "other contract": json.dumps({**good, "contract_version": contract.CONTRACT_VERSION + 1}),
        "no io": json.dumps({k: v for k, v in good.items() if k != "io"}),
    }
    expected = {
        "missing": "not found",
        "corrupt": "corrupt",
        "wrong kind": "'engine' artifact",
        "other moetrt": "0.0.1",
        "other contract": "contract version",
        "no io": "'io'",
    }
    for case, text in cases.items():
        d = tmp_path / case.replace(" ", "_")
        d.mkdir()
        if text is not None:
            (d / artifacts.MANIFEST).write_text(text)
        with pytest.raises(MoetrtError) as excinfo:
            artifacts.read_manifest(d, "export")
        assert_one_line_error(excinfo, expected[case])
    assert len(artifacts.artifact_hash(exported)) == 64


@pytest.mark.slow
def test_mixtral_8x7b_graph_on_meta(big_export):
    proc, out = big_export
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    stats = json.loads(stdout.strip().splitlines()[-1])
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    assert len(moe_nodes(proto)) == 32
    assert not (out / DATA_FILE).exists()
    assert artifacts.read_manifest(out, "export")["weights"] is False
    assert stats["peak_rss"] < 2 * 1024**3, stats
