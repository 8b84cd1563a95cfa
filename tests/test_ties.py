"""Exact router ties: a checkpoint whose routers are zeroed ties every expert of every token, so the op
contract's tie rule (moetrt/plugins/contract.py: the higher expert index first) alone decides the routing.

The choice is asserted where it is made: the eager reference, the ONNX Runtime engine (fp32 unsliced, int4)
and validation, which must name the ties and write a valid JSON report. The Triton kernels' choice is in
tests/test_kernels.py (test_route_all_tied, test_route_tie_rule_higher_index_first).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from moetrt.engines.ort import build_ort_engine
from moetrt.export import export_checkpoint
from moetrt.model.checkpoint import load_model
from moetrt.model.config import PRESETS
from moetrt.model.mixtral import route, sparse_moe
from moetrt.model.testing import make_checkpoint
from moetrt.names import moe_input, moe_output
from moetrt.runtime.engine import load_backend
from moetrt.validate import validate

CONFIG = dataclasses.replace(PRESETS["tiny"], num_local_experts=8, num_experts_per_tok=2)
RULE = [7, 6]  # the top-2 of 8 exactly tied experts under the contract
OTHER = [0, 1]  # the lower-index-first choice the contract used to make
PROMPT = np.array([[1, 17, 42, 99, 300, 5, 77]], dtype=np.int64)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("ties")
    checkpoint = make_checkpoint(root / "ckpt", CONFIG, seed=3, zero_router=True)
    export = export_checkpoint(checkpoint, root / "export", max_seq_len=48, max_batch=2)
    return root, checkpoint, export


def moe_with(model, layer: int, x: torch.Tensor, experts: list[int]) -> torch.Tensor:
    """Layer `layer`'s MoE output on `x` [T, H] with the given experts at equal weight (what a tie yields)."""
    block = model.layers[layer].block_sparse_moe
    ys = [(torch.nn.functional.silu(x @ block.w1[e].t()) * (x @ block.w3[e].t())) @ block.w2[e].t() for e in experts]
    return sum(ys) / len(experts)


def test_route_breaks_exact_ties_to_the_higher_index():
    experts, weights = route(torch.zeros(3, 8), 2)
    assert experts.tolist() == [RULE] * 3
    assert torch.equal(weights, torch.full((3, 2), 0.5))
    # a tie below a clear winner: expert 0 first, then the highest of the tied 2, 5, 6
    experts, _ = route(torch.tensor([[4.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]]), 3)
    assert experts.tolist() == [[0, 6, 5]]


def per_layer(backend, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    backend.step(PROMPT, np.arange(PROMPT.shape[1])[None])
    return [
        (torch.from_numpy(backend.extras[moe_input(i)]), torch.from_numpy(backend.extras[moe_output(i)]))
        for i in range(CONFIG.num_hidden_layers)
    ]


def test_eager_reference_takes_the_higher_experts(tied):
    _, checkpoint, _ = tied
    model = load_model(checkpoint)
    names = [n for i in range(CONFIG.num_hidden_layers) for n in (moe_input(i), moe_output(i))]
    with torch.inference_mode(), load_backend(checkpoint, extra_outputs=names, max_seq_len=48) as eager:
        for i, (x, y) in enumerate(per_layer(eager, model)):
            torch.testing.assert_close(y, moe_with(model, i, x, RULE), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(y, moe_with(model, i, x, OTHER), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_ort_engine_takes_the_higher_experts(tied, precision):
    """fp32 built for one thread (unsliced experts: a sliced engine deviates on exact ties, see
    moetrt/engines/ort_lowering.py) and int4 (QMoE). The engine's MoE output on its own input is the rule's
    choice: exactly (fp32), or far closer to it than to the other choice (int4)."""
    root, checkpoint, export = tied
    model = load_model(checkpoint)
    engine = build_ort_engine(export, root / f"engine-{precision}", precision, threads=1)
    names = [n for i in range(CONFIG.num_hidden_layers) for n in (moe_input(i), moe_output(i))]
    with torch.inference_mode(), load_backend(engine, extra_outputs=names) as ort:
        for i, (x, y) in enumerate(per_layer(ort, model)):
            x = x.reshape(-1, CONFIG.hidden_size)
            y = y.reshape(-1, CONFIG.hidden_size)
            rule, other = moe_with(model, i, x, RULE), moe_with(model, i, x, OTHER)
            torch.testing.assert_close(sparse_moe(x, model.layers[i].block_sparse_moe.gate.weight,
                                                  *(getattr(model.layers[i].block_sparse_moe, w)
                                                    for w in ("w1", "w3", "w2")), 2), rule)  # fmt: skip
            if precision == "fp32":
                torch.testing.assert_close(y, rule, rtol=1e-4, atol=1e-5)
            else:
                assert (y - rule).abs().max() < 0.25 * (y - other).abs().max()


def test_validate_names_the_ties_and_writes_valid_json(tied, tmp_path):
    """The all-ties checkpoint against an fp32 engine (one thread): every figure finite, JSON strict, the
    routing check reports the exact ties it saw."""
    root, checkpoint, export = tied
    engine = build_ort_engine(export, root / "engine-fp32-validate", "fp32", threads=1)
    out = tmp_path / "report.json"
    report = validate(checkpoint, engine, num_random=2, steps=4, json_out=out)
    text = out.read_text()
    body = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite {c} in the JSON report"))
    assert "nan" not in report.verdict().lower()
    routing = next(c for c in body["checks"] if c["name"] == "routing")
    ties = sum(v["exact_ties"] for k, v in routing["figures"].items() if k.isdigit())
    assert ties > 0 and "exact ties" in routing["summary"]
    assert report.passed, report.verdict()
    for check in body["checks"]:
        for value in json.dumps(check["figures"]).split():
            assert "NaN" not in value and "Infinity" not in value
    assert all(math.isfinite(c["figures"].get("top1", 0.0)) for c in body["checks"])
