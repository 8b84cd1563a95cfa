"""Measure what moetrt/validate/tolerances.py's table is set from: every check's figures for ORT engines of
seeded random checkpoints, worst case over the models.

    python benchmarks/measure_tolerances.py [--precisions fp32,int8,int4] [--models tiny3,small,...]
                                            [--workdir DIR] [--json OUT]

Models (seeded, std as listed): "tiny3" = tiny preset with 3 layers (std 0.2), "small" = H 256, F 512,
4 layers, 8 experts top-2, vocab 2048 (std 0.08), "e8k1" = the engine tests' top-1-of-8 variant (tied
embeddings, sliding window 6; std 0.2), "real" = the small shape with std 0.02 weights (random weights at
transformers' initializer range behave more like a trained model: flatter logits, fewer flips). Each
engine is validated on 12 seeded random prompts, batch 2, 32 greedy steps, against its own checkpoint and
("wrong" rows) against a checkpoint of the same model with another seed, bypassing the manifest check:
what a wrong model scores, which the quantized floors must reject. The columns are the table's: logits
rel (max), top1/top5 (min), state rel (max over new K/V, MoE input/output), moe rel (max), flip margin
(largest near-tie flipped margin), clear flips (max fraction of a layer's tokens), routing matched (min
fraction of a layer's tokens), greedy first divergence (min step), divergence margin (largest eager margin
at a row's first divergence, x max |logits|), identical rows, mean agreement (mean
fraction of greedy steps before a row's first divergence), kv rel (max). The tolerances are set 2-3x
beyond the worst correct case, and the floors between the correct and the wrong rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from moetrt.engines.ort import build_ort_engine
from moetrt.export import export_checkpoint
from moetrt.model.config import PRESETS
from moetrt.model.testing import make_checkpoint
from moetrt.validate import open_engine, validate_engine

MODELS = {
    "tiny3": (dict(num_hidden_layers=3), 0.2),
    "small": (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=32, num_local_experts=8, vocab_size=2048), 0.08),
    "e8k1": (dict(num_local_experts=8, num_experts_per_tok=1, hidden_size=96, intermediate_size=160,
                  num_hidden_layers=1, num_key_value_heads=4, tie_word_embeddings=True, sliding_window=6), 0.2),
    "real": (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, num_local_experts=8, vocab_size=2048), 0.02),
}  # fmt: skip
STEPS, PROMPTS, BATCH = 32, 12, 2


def rel(error: dict) -> float:
    """An Error's rel (null in the JSON when infinite: a missing output or a shape mismatch)."""
    return float("inf") if error["rel"] is None else error["rel"]


def figures(report: dict) -> dict[str, float | bool | None]:
    """One validation report (its JSON form) -> the table's columns."""
    checks = {c["name"]: c["figures"] for c in report["checks"]}
    layers = [v for k, v in checks["layers"].items() if k.isdigit()]
    routing = [v for k, v in checks["routing"].items() if k.isdigit()]
    kv = [v for k, v in checks["kv_cache"].items() if k.isdigit()]
    state = ("new_key", "new_value", "moe_input", "moe_output")
    rows = checks["greedy"]["rows"]
    return {
        "passed": report["passed"],
        "logits": checks["logits"]["rel"],
        "top1": checks["logits"]["top1"],
        "top5": checks["logits"]["top5"],
        "state": max(rel(layer[name]) for layer in layers for name in state if name in layer),
        "moe": max(rel(layer["moe_block"]) for layer in layers if "moe_block" in layer),
        "flip_margin": max((r["largest_flipped_margin"] or 0.0 for r in routing if r["near_tie_flips"]), default=0.0),
        "clear_flips": max(r["clear_flips"] / max(r["tokens"], 1) for r in routing),
        "routing_matched": min((r["matched"] for r in routing if r["matched"] is not None), default=None),
        "first_divergence": min(
            (r["first_divergence"] for r in rows if r["first_divergence"] is not None), default=None
        ),  # fmt: skip
        "divergence_margin": max((r["margin"] for r in rows if r["margin"] is not None), default=None),
        "identical_rows": sum(r["first_divergence"] is None for r in rows) / len(rows),
        "mean_agreement": sum(r["agreement"] for r in rows) / len(rows),
        "kv": max(rel(layer[p]) for layer in kv for p in ("k", "v")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="moetrt-tolerances-"))
    results: dict[str, dict[str, dict[str, float | bool | None]]] = {}
    for name in args.models.split(","):
        overrides, std = MODELS[name]
        config = dataclasses.replace(PRESETS["tiny"], **overrides)
        checkpoint = make_checkpoint(root / name / "checkpoint", config, seed=0, std=std)
        other = make_checkpoint(root / name / "other-seed", config, seed=1, std=std)
        export = export_checkpoint(checkpoint, root / name / "export", max_seq_len=96, max_batch=BATCH, progress=False)
        for precision in args.precisions.split(","):
            engine = build_ort_engine(export, root / name / precision, precision, threads=2, progress=False)
            for label, source in ((name, checkpoint), (f"{name} wrong", other)):
                report = validate_engine(source, open_engine(engine, checkpoint), num_random=PROMPTS, steps=STEPS,
                                         batch=BATCH)  # fmt: skip
                results.setdefault(precision, {})[label] = figures(report.to_dict())
                print(label, precision, {k: v if not isinstance(v, float) else float(f"{v:.3g}")
                                         for k, v in results[precision][label].items()}, flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
