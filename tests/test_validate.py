"""`moetrt validate` on a tiny 3-layer checkpoint: it passes a correct ONNX Runtime fp32 engine and fails,
naming the check and the layer, each engine broken on purpose the way a real bug would break it:

    (a) one expert's w2 perturbed in layer 1 (a bad weight write)      -> layers, layer 1 (the MoE block)
    (b) w1/w3 swapped in every fused fc1 (a wrong lowering layout)     -> layers, layer 0 (the MoE block)
    (c) the router weight perturbed in layer 1                         -> routing, layer 1
    (d) normalize_routing_weights=0 on every MoE node                  -> layers, layer 0 (layer 0 routes right)
    (e) a backend that writes new K/V one position late                -> kv_cache, layer 0; graph checks pass

Broken engines are copies of the good one with their ONNX graph edited (weights stay external), so one
export (the slow part, ~40 s) serves every test. Also: `polygraphy run ... --onnxrt` from the command
line, as docs/validation.md documents it, agrees on the ORT engine and disagrees on the broken lowering.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from rich.console import Console

from moetrt.cli import print_validation
from moetrt.engines.ort import build_ort_engine
from moetrt.errors import MoetrtError
from moetrt.export.exporter import export_checkpoint
from moetrt.model.config import PRESETS
from moetrt.model.testing import make_checkpoint
from moetrt.runtime.eager_backend import EagerBackend
from moetrt.validate import open_engine, validate, validate_engine

CONFIG = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=3)
MAX_SEQ = 64
RUN = {"num_random": 4, "steps": 12, "batch": 2}  # batch 2 over prompts of unequal random lengths


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("validate") / "ckpt", CONFIG, seed=0)


@pytest.fixture(scope="module")
def export_dir(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validate") / "export"
    return export_checkpoint(checkpoint, out, max_seq_len=MAX_SEQ, max_batch=2)


@pytest.fixture(scope="module")
def engine(export_dir, tmp_path_factory) -> Path:
    return build_ort_engine(export_dir, tmp_path_factory.mktemp("validate") / "ort-fp32")


def edited_engine(engine: Path, out: Path, edit: Callable[[onnx.GraphProto], None]) -> Path:
    """A copy of `engine` whose graph (weights loaded) `edit` changed in place."""
    out.mkdir()
    model = onnx.load(str(engine / "model.onnx"))
    edit(model.graph)
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    shutil.copy(engine / "moetrt.json", out / "moetrt.json")
    return out


def moe_node(graph: onnx.GraphProto, layer: int) -> onnx.NodeProto:
    return next(n for n in graph.node if n.op_type == "MoE" and n.output[0] == f"layers.{layer}.moe_output")


def update_initializer(graph: onnx.GraphProto, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    tensor = next(t for t in graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()), name))


def checks_of(report) -> dict:
    return {c.name: c for c in report.checks}


def test_passes_on_a_correct_fp32_engine(checkpoint, engine, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox jumps over the lazy dog.\n\nMixture-of-Experts models route tokens.\n")
    report = validate(checkpoint, engine, prompts_file=prompts, json_out=tmp_path / "report.json", **RUN)
    assert report.passed, report.verdict()
    figures = {c.name: c.figures for c in report.checks}
    assert figures["logits"]["rel"] < 1e-5 and figures["logits"]["top1"] == 1.0
    assert all(row["first_divergence"] is None for row in figures["greedy"]["rows"])
    assert [row["prompt"] for row in figures["greedy"]["rows"]][:2] == ["file line 1", "file line 3"]

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["passed"] is True and data["first_failure"] is None
    assert [c["name"] for c in data["checks"]] == ["logits", "layers", "routing", "greedy", "kv_cache"]
    assert all(c["passed"] and c["tolerance"] for c in data["checks"])
    assert data["checks"][1]["figures"]["2"]["moe_output"]["rel"] < 1e-4

    console = Console(record=True, width=200)
    print_validation(report, console)
    text = console.export_text()
    assert f"PASS: ort engine {engine} (fp32)" in text and "kv_cache" in text


def test_perturbed_expert_w2_names_layer_1(checkpoint, engine, tmp_path):
    def perturb(graph):
        def change(w2):  # [E, H, F]: expert 0 of layer 1 only, by half its own scale
            w2[0] += 0.5 * w2[0].std() * np.random.default_rng(0).standard_normal(w2[0].shape, dtype=np.float32)
            return w2

        update_initializer(graph, moe_node(graph, 1).input[4], change)

    report = validate(checkpoint, edited_engine(engine, tmp_path / "bad", perturb), **RUN)
    layers = checks_of(report)["layers"]
    assert not report.passed and not layers.passed
    assert layers.layer == 1 and "layers.1.moe_block" in layers.summary
    assert layers.figures["0"]["moe_output"]["passed"]
    assert report.first_failure.name == "layers" and report.first_failure.layer == 1


def swap_w1_w3(fc1: np.ndarray) -> np.ndarray:
    """fc1 [E, 2F, H] interleaves w1 (even rows) and w3 (odd rows); a wrong lowering puts them the other way."""
    swapped = np.empty_like(fc1)
    swapped[:, 0::2], swapped[:, 1::2] = fc1[:, 1::2], fc1[:, 0::2]
    return swapped


def swapped_lowering(graph: onnx.GraphProto) -> None:
    for layer in range(CONFIG.num_hidden_layers):
        update_initializer(graph, moe_node(graph, layer).input[2], swap_w1_w3)


def test_swapped_w1_w3_in_the_lowering_names_layer_0(checkpoint, engine, tmp_path):
    report = validate(checkpoint, edited_engine(engine, tmp_path / "bad", swapped_lowering), **RUN)
    layers = checks_of(report)["layers"]
    assert not layers.passed and layers.layer == 0 and "layers.0.moe_block" in layers.summary
    assert report.first_failure.layer == 0


def test_perturbed_router_fails_routing_at_layer_1(checkpoint, engine, tmp_path):
    def perturb(graph):
        router = next(n for n in graph.node if n.output[0] == "layers.1.router_logits")
        update_initializer(
            graph, router.input[1], lambda w: w + np.random.default_rng(1).standard_normal(w.shape, dtype=np.float32)
        )

    report = validate(checkpoint, edited_engine(engine, tmp_path / "bad", perturb), **RUN)
    routing = checks_of(report)["routing"]
    assert not routing.passed and routing.layer == 1
    assert routing.figures["0"]["clear_flips"] == 0 and routing.figures["1"]["clear_flips"] > 0
    assert checks_of(report)["layers"].layer == 1


def test_normalization_off_fails_layers_not_routing(checkpoint, engine, tmp_path):
    def no_normalization(graph):
        for layer in range(CONFIG.num_hidden_layers):
            attribute = next(a for a in moe_node(graph, layer).attribute if a.name == "normalize_routing_weights")
            attribute.i = 0

    report = validate(checkpoint, edited_engine(engine, tmp_path / "bad", no_normalization), **RUN)
    checks = checks_of(report)
    assert not checks["layers"].passed and checks["layers"].layer == 0
    assert "layers.0.moe_block" in checks["layers"].summary
    # Layer 0 selects the same experts, only their weights are wrong; later layers route a drifted input.
    assert checks["routing"].figures["0"]["clear_flips"] == 0
    assert report.first_failure.name == "layers" and report.first_failure.layer == 0


class OffByOneBackend(EagerBackend):
    """Writes each step's new K/V at position + 1: the reads are right, the bookkeeping is not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        write = self.cache.write
        self.cache.write = lambda positions, k, v, rows=None: write(positions + 1, k, v, rows)


def test_kv_cache_off_by_one_fails_kv_cache_at_layer_0(checkpoint, engine):
    from moetrt.model.checkpoint import load_model

    opened = open_engine(engine, checkpoint)
    model = load_model(checkpoint)
    broken = dataclasses.replace(opened, load_backend=lambda batch: OffByOneBackend(model, batch, MAX_SEQ))
    report = validate_engine(checkpoint, broken, **RUN)
    checks = checks_of(report)
    assert checks["logits"].passed and checks["layers"].passed and checks["routing"].passed
    assert not checks["kv_cache"].passed and checks["kv_cache"].layer == 0
    assert not report.passed and report.first_failure.name == "kv_cache"


def test_engine_of_another_model_is_refused_in_one_line(engine, tmp_path):
    other = make_checkpoint(tmp_path / "other", dataclasses.replace(CONFIG, rope_theta=500.0), seed=0)
    with pytest.raises(MoetrtError, match=r"another model \(rope_theta") as err:
        validate(other, engine, **RUN)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def int4_engine(export_dir, tmp_path_factory) -> Path:
    return build_ort_engine(export_dir, tmp_path_factory.mktemp("validate") / "ort-int4", "int4", progress=False)


def test_engine_of_other_weights_is_refused_in_one_line(int4_engine, tmp_path):
    """Same architecture, same file layout, other weights: the engine's manifest chain names its checkpoint."""
    other = make_checkpoint(tmp_path / "other", CONFIG, seed=1)
    with pytest.raises(MoetrtError, match=r"engine not built from .*other weights") as err:
        validate(other, int4_engine, **RUN)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A std-0.02 checkpoint (transformers' initializer range: flatter logits, like a trained model's), its
    int4 engine, and a checkpoint of the same model with other weights."""
    root = tmp_path_factory.mktemp("realistic")
    checkpoint = make_checkpoint(root / "ckpt", CONFIG, seed=0, std=0.02)
    other = make_checkpoint(root / "other", CONFIG, seed=1, std=0.02)
    export = export_checkpoint(checkpoint, root / "export", max_seq_len=MAX_SEQ, max_batch=2)
    return checkpoint, build_ort_engine(export, root / "int4", "int4"), other


def test_int4_tolerances_pass_the_engine_and_fail_another_model(realistic):
    """The quantized floors can fail: the right int4 engine passes; the same engine judged against other
    weights (the manifest check bypassed) fails its value checks, and no check passes on nothing."""
    checkpoint, engine, other = realistic
    right = validate_engine(checkpoint, open_engine(engine, checkpoint), **RUN)
    assert right.passed, right.verdict()
    wrong = validate_engine(other, open_engine(engine, checkpoint), **RUN)
    failed = {c.name for c in wrong.checks if not c.passed}
    assert {"logits", "layers", "greedy"} <= failed, wrong.verdict()
    json.dumps(wrong.to_dict(), allow_nan=False)


def polygraphy(*args: str | Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("polygraphy")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_polygraphy_cli_compares_the_engine_with_the_export(export_dir, engine, tmp_path):
    """The recipe of docs/validation.md: the raw export runs under `--onnxrt` once it carries the reference
    TopKMoE function; its outputs are then the reference for `polygraphy run` on the engine's graph."""
    reference = tmp_path / "export"
    shutil.copytree(export_dir, reference)
    subprocess.run(
        [sys.executable, "-m", "moetrt.validate.reference_model", str(reference)], check=True, capture_output=True
    )
    values = [f"layers.{i}.{v}" for i in range(CONFIG.num_hidden_layers) for v in ("moe_input", "moe_output")]
    # A prefill of 8 tokens at positions 0..7 over empty caches: the engine's GroupQueryAttention derives each
    # row's length from its last position, so random positions (Polygraphy's default data) are not a step.
    from polygraphy.json import save_json

    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, CONFIG.vocab_size, (1, 8)), "position_ids": np.arange(8)[None]}
    cache = np.zeros((1, CONFIG.num_key_value_heads, MAX_SEQ, CONFIG.head_dim), np.float32)
    feed |= {f"past_{kv}.{i}": cache for i in range(CONFIG.num_hidden_layers) for kv in ("key", "value")}
    inputs, outputs = tmp_path / "inputs.json", tmp_path / "reference.json"
    save_json([feed], inputs)
    ran = polygraphy("run", reference / "model.ref.onnx", "--onnxrt", "--load-inputs", inputs,
                     "--onnx-outputs", "logits", *values, "--save-outputs", outputs)  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]

    def compare(engine_dir: Path) -> subprocess.CompletedProcess:
        return polygraphy("run", engine_dir / "model.onnx", "--onnxrt", "--onnx-outputs", "logits", *values,
                          "--load-inputs", inputs, "--load-outputs", outputs, "--check-error-stat", "max",
                          "--atol", "1e-4", "--rtol", "1e-4")  # fmt: skip

    good = compare(engine)
    assert good.returncode == 0 and "PASSED" in good.stdout, good.stdout[-3000:]
    bad = compare(edited_engine(engine, tmp_path / "bad", swapped_lowering))
    assert bad.returncode != 0 and "layers.0.moe_output" in bad.stdout
