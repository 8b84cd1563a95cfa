"""Expert-load statistics (`moetrt routes`, moetrt.routes) and the routing outputs they read.

The planted checkpoint makes routing a known function of the token: attention and expert outputs are zero
(o_proj = w2 = 0), so every layer's MoE input is the normalized embedding; token v's embedding is 4 on
dimension v % 4 and 2 on (v + 1) % 4 (plus small noise on dimensions >= 4, which the router does not read);
layer l's router row e reads dimension (e + l) % 4. So at layer l token v picks expert (v - l) % 4 first and
(v + 1 - l) % 4 second, with no ties, and every figure below is worked out by hand from the token ids.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from moetrt.engines.ort import build_ort_engine
from moetrt.engines.ort_lowering import route_function
from moetrt.errors import MoetrtError
from moetrt.export import export_checkpoint
from moetrt.model.checkpoint import save_checkpoint
from moetrt.model.config import PRESETS
from moetrt.model.mixtral import route
from moetrt.model.testing import make_checkpoint, random_state, train_tokenizer
from moetrt.names import MODEL_FILE, ROUTE_FUNCTION, TOKENIZER, expert_ids, expert_weights
from moetrt.routes.live import ExpertLoad
from moetrt.routes.report import summarize
from moetrt.routes.run import run_routes
from moetrt.routes.stats import layer_stats
from moetrt.routes.trace import routing_outputs, trace_sequence
from moetrt.runtime.engine import load_backend

MAX_SEQ = 64
PROMPT = [4, 8, 12, 1, 2]  # layer 0 first choices 0 0 0 1 2; layer 1: 3 3 3 0 1
FORCED = [3, 7, 11, 5]  # generated part, layer 0 first choices 3 3 3 1; layer 1: 2 2 2 0


def planted_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    state = random_state(config, seed)
    e = config.num_local_experts
    gen = torch.Generator().manual_seed(seed)
    embed = torch.zeros(config.vocab_size, config.hidden_size)
    embed[:, e:] = 0.1 * torch.randn(config.vocab_size, config.hidden_size - e, generator=gen)
    v = torch.arange(config.vocab_size)
    embed[v, v % e] = 4.0
    embed[v, (v + 1) % e] = 2.0
    state["embed_tokens.weight"] = embed
    for layer in range(config.num_hidden_layers):
        prefix = f"layers.{layer}"
        state[f"{prefix}.self_attn.o_proj.weight"].zero_()
        state[f"{prefix}.block_sparse_moe.w2"].zero_()
        state[f"{prefix}.post_attention_layernorm.weight"].fill_(1.0)
        gate = torch.zeros(e, config.hidden_size)
        gate[torch.arange(e), (torch.arange(e) + layer) % e] = 5.0
        state[f"{prefix}.block_sparse_moe.gate.weight"] = gate
    return state


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(checkpoint, ORT fp32 engine) of the planted model."""
    root = tmp_path_factory.mktemp("planted")
    config = PRESETS["tiny"]
    checkpoint = save_checkpoint(planted_state(config), config, root / "ckpt")
    train_tokenizer(config.vocab_size, checkpoint / TOKENIZER)
    export = export_checkpoint(checkpoint, root / "export", max_seq_len=MAX_SEQ, max_batch=1, progress=False)
    return checkpoint, build_ort_engine(export, root / "engine", "fp32", threads=1, progress=False)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """(checkpoint, ORT fp32 engine, the checkpoint with layer 1's router rows rolled) of a 3-layer tiny model."""
    root = tmp_path_factory.mktemp("routes")
    config = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=3)
    checkpoint = make_checkpoint(root / "ckpt", config, seed=5)
    export = export_checkpoint(checkpoint, root / "export", max_seq_len=MAX_SEQ, max_batch=1, progress=False)
    engine = build_ort_engine(export, root / "engine", "fp32", threads=1, progress=False)
    state = random_state(config, seed=5)
    gate = "layers.1.block_sparse_moe.gate.weight"
    state[gate] = torch.roll(state[gate], 1, dims=0)
    perturbed = save_checkpoint(state, config, root / "perturbed")
    train_tokenizer(config.vocab_size, perturbed / TOKENIZER)
    return checkpoint, engine, perturbed


def expected_ids(tokens: list[int], layer: int, experts: int = 4) -> np.ndarray:
    v = np.asarray(tokens)
    return np.stack([(v - layer) % experts, (v + 1 - layer) % experts], axis=1)


@pytest.mark.parametrize("which", ["eager", "ort"])
def test_planted_routing_gives_the_hand_computed_figures(planted, which, one_torch_thread):
    checkpoint, engine = planted
    path = checkpoint if which == "eager" else engine
    extra = {"max_seq_len": MAX_SEQ} if which == "eager" else {}
    with load_backend(path, max_batch=1, extra_outputs=routing_outputs(2), **extra) as backend:
        seq = trace_sequence(backend, "planted", PROMPT, 0, forced=FORCED)
    assert seq.generated == FORCED
    for layer in range(2):
        np.testing.assert_array_equal(seq.expert_ids[layer], expected_ids(PROMPT + FORCED, layer))
    report = summarize(str(path), which, 4, [seq])
    prompt0, prompt1 = report.layers["prompt"]
    # layer 0, prompt sets {0,1} {0,1} {0,1} {1,2} {2,3}
    assert prompt0.tokens == 5 and prompt0.counts == [3, 4, 2, 1]
    assert prompt0.shares == pytest.approx([0.3, 0.4, 0.2, 0.1])
    assert prompt0.balancedness == pytest.approx(2.5 / 4)
    assert prompt0.entropy_bits == pytest.approx(-sum(p * np.log2(p) for p in (0.3, 0.4, 0.2, 0.1)))
    assert prompt0.top_pairs[0] == (0, 1, pytest.approx(3 / 5))
    assert prompt0.consecutive_pairs == 4
    assert prompt0.same_first == pytest.approx(2 / 4) and prompt0.same_any == pytest.approx(1.0)
    assert prompt0.same_first_chance == pytest.approx(1 / 4)
    assert prompt0.same_any_chance == pytest.approx(1 - 1 / 6)  # C(2,2) / C(4,2)
    assert prompt0.same_first_chance_load == pytest.approx(0.6**2 + 0.2**2 + 0.2**2)
    # layer 1, prompt sets {3,0} x3, {0,1}, {1,2}; first choices 3 3 3 0 1
    assert prompt1.counts == [4, 2, 1, 3] and prompt1.same_first == pytest.approx(2 / 4)
    gen0, gen1 = report.layers["generated"]
    # generated tokens 3 7 11 5: layer 0 sets {3,0} x3, {1,2}; the prompt's last token is not paired with them
    assert gen0.counts == [3, 1, 1, 3] and gen0.consecutive_pairs == 3
    assert gen0.same_first == pytest.approx(2 / 3) and gen0.same_any == pytest.approx(2 / 3)
    assert gen1.counts == [1, 1, 3, 3]


def test_layer_stats_keeps_segments_apart():
    """Consecutive pairs never span two sequences: two one-token segments have none."""
    stats = layer_stats([np.array([[0, 1]]), np.array([[0, 1]])], 4)
    assert stats.consecutive_pairs == 0 and stats.same_first == 0.0
    joined = layer_stats([np.array([[0, 1], [0, 1]])], 4)
    assert joined.consecutive_pairs == 1 and joined.same_first == 1.0


def test_route_function_follows_the_contract_tie_rule():
    """The engine's routing function (ONNX Softmax + TopK) against the eager `route`, exact ties included."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 8)).astype(np.float32)
    logits[0] = 0.0  # all tied: experts 7, 6
    logits[1] = [0.1, 0.5, 0.5, 0.2, 0.5, 0, 0, 0]  # three tied at the top: 4, 2
    value = ir.Value(name="logits", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["T", 8]))
    domain, name = ROUTE_FUNCTION
    call = ir.Node(domain, name, [value], num_outputs=2)
    call.outputs[0].name, call.outputs[1].name = "ids", "weights"
    graph = ir.Graph([value], list(call.outputs), nodes=[call], opset_imports={"": 18, domain: 1})
    function = route_function(2, True, 18)
    model = ir.Model(graph, ir_version=10, functions=[function])
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    ids, weights = session.run(None, {"logits": logits})
    ref_ids, ref_weights = route(torch.from_numpy(logits), 2)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(weights, ref_weights.numpy(), rtol=1e-6)
    assert ids[0].tolist() == [7, 6] and ids[1].tolist() == [4, 2]


def test_routing_outputs_cost_nothing_unless_requested(planted):
    """The saved engine carries the routing function but no call of it; a session asked for expert ids adds one
    call per layer."""
    import onnx

    _, engine = planted
    proto = onnx.load(str(engine / MODEL_FILE), load_external_data=False)
    assert [(f.domain, f.name) for f in proto.functions] == [ROUTE_FUNCTION]
    assert not [n for n in proto.graph.node if n.domain == ROUTE_FUNCTION[0]]
    with load_backend(engine, max_batch=1, extra_outputs=[expert_ids(1), expert_weights(1)]) as backend:
        backend.step(np.asarray([PROMPT]), np.arange(len(PROMPT))[None])
        np.testing.assert_array_equal(backend.extras[expert_ids(1)], expected_ids(PROMPT, 1))
        assert backend.extras[expert_weights(1)].shape == (len(PROMPT), 2)
        np.testing.assert_allclose(backend.extras[expert_weights(1)].sum(axis=1), 1.0, rtol=1e-6)


def test_ort_engine_routes_as_eager(random_model, one_torch_thread):
    """fp32 engine vs the eager model on the same tokens: the same expert set for every token of every layer,
    so the same counts; and run on its own, eager generates the same tokens and counts the same."""
    checkpoint, engine, _ = random_model
    report = run_routes(engine, num_random=3, max_new_tokens=8, compare_with=checkpoint)
    assert report.backend == "ort" and report.compare is not None and report.compare.backend == "eager"
    assert [layer.set_agreement for layer in report.compare.layers] == [1.0, 1.0, 1.0]
    assert all(delta == 0.0 for layer in report.compare.layers for delta in layer.share_delta)
    eager = run_routes(checkpoint, num_random=3, max_new_tokens=8)
    assert eager.sequences == report.sequences
    for part in ("prompt", "generated"):
        assert [s.counts for s in eager.layers[part]] == [s.counts for s in report.layers[part]]
        assert report.layers[part][0].tokens > 0


def test_compare_names_the_perturbed_layer(random_model, one_torch_thread):
    checkpoint, engine, perturbed = random_model
    same = run_routes(engine, num_random=2, max_new_tokens=4, compare_with=engine)
    assert [layer.set_agreement for layer in same.compare.layers] == [1.0, 1.0, 1.0]
    assert same.compare.diverging_layer is None
    report = run_routes(engine, num_random=2, max_new_tokens=4, compare_with=perturbed)
    agreement = [layer.set_agreement for layer in report.compare.layers]
    assert agreement[0] == 1.0 and agreement[1] < 0.5, agreement
    assert report.compare.diverging_layer == 1


def test_live_counters(planted, one_torch_thread):
    """A real eager step's routing into a fresh registry: counter per (layer, expert), balancedness gauge, and
    padding rows left out."""
    from prometheus_client import CollectorRegistry, generate_latest

    checkpoint, _ = planted
    registry = CollectorRegistry()
    load = ExpertLoad(2, 4, registry=registry)
    with load_backend(checkpoint, max_batch=1, max_seq_len=MAX_SEQ, extra_outputs=load.outputs) as backend:
        backend.step(np.asarray([PROMPT + [0, 0]]), np.arange(len(PROMPT) + 2)[None])
        load.observe(backend.extras, rows=np.arange(len(PROMPT)))  # the last two rows are padding
    value = registry.get_sample_value
    assert [value("moetrt_expert_tokens_total", {"layer": "0", "expert": str(e)}) for e in range(4)] == [3, 4, 2, 1]
    assert [value("moetrt_expert_tokens_total", {"layer": "1", "expert": str(e)}) for e in range(4)] == [4, 2, 1, 3]
    assert value("moetrt_expert_balancedness", {"layer": "0"}) == pytest.approx(2.5 / 4)
    assert b'moetrt_expert_tokens_total{expert="0",layer="0"} 3.0' in generate_latest(registry)


def test_cli_routes_writes_json_and_png(random_model, tmp_path):
    checkpoint, engine, _ = random_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n[INST] routing [/INST]\n")
    out, png = tmp_path / "routes.json", tmp_path / "routes.png"
    cmd = [sys.executable, "-m", "moetrt", "routes", str(engine), "--prompts", str(prompts), "--max-new-tokens", "4",
           "--json", str(out), "--plot", str(png), "--compare", str(checkpoint)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[INST] routing [/INST]" not in done.stdout  # prompts are not echoed; labels are "file line N"
    assert "generated tokens" in done.stdout and "first layer below 90%" in done.stdout
    data = json.loads(out.read_text())
    assert len(data["layers"]["prompt"]) == 3 and data["compare"]["diverging_layer"] is None
    assert sum(data["layers"]["prompt"][0]["counts"]) == 2 * sum(s["prompt_tokens"] for s in data["sequences"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_routes_refuses_bad_input(random_model, tmp_path):
    """One line naming what is wrong, before anything runs; the CLI prints it as `error: ...` with exit 2."""
    _, engine, _ = random_model
    with pytest.raises(MoetrtError, match="exactly one of"):
        run_routes(engine, num_random=1, prompts_file=tmp_path / "p.txt")
    with pytest.raises(MoetrtError, match=str(tmp_path)):
        run_routes(engine, num_random=1, compare_with=tmp_path)
    cmd = [sys.executable, "-m", "moetrt", "routes", str(engine)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "exactly one of" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
