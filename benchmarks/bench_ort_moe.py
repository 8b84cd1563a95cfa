"""Benchmark one lowered MoE layer on ONNX Runtime's CPU kernels: fp32 MoE (whole and sliced) vs QMoE int8 / int4.

    python benchmarks/bench_ort_moe.py [--tokens 1 128] [--threads 2] [--rounds 5] [--json PATH]

The benchmark configuration of the issues by default (H=1024, F=3584, E=8, k=2, 2 intra-op threads). Each
precision is one TopKMoE node lowered by `moetrt.engines.ort_lowering` (router MatMul + MoE / QMoE with
block 32, accuracy_level 4) in a session from `moetrt.runtime.ort_session.session_options`, i.e. exactly
what an engine runs. Eager `sparse_moe` (torch, same thread count) is the reference for accuracy and a
baseline for time. Variants are timed in interleaved rounds and medians reported, because a shared
machine's speed drifts by several x; compare the ratios, not the absolute numbers, across runs. `fp32-sliced`
is what an fp32 engine runs: every expert cut into one slice per thread (ort_lowering.moe_slices).

`expert_gbs` (decode only) = bytes of the k experts one token reads in that precision / time: how close
the kernel gets to memory bandwidth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from moetrt.engines.ort_lowering import PRECISIONS, lower_topk_moe, moe_slices
from moetrt.model.mixtral import sparse_moe
from moetrt.plugins import contract
from moetrt.runtime.ort_session import session_options

INPUT, OUTPUT = "layers.0.moe_input", "layers.0.moe_output"


def weights(h: int, f: int, e: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "router": rng.standard_normal((e, h)) * 0.1,
        "w1": rng.standard_normal((e, f, h)) * 0.02,
        "w3": rng.standard_normal((e, f, h)) * 0.02,
        "w2": rng.standard_normal((e, h, f)) * 0.02,
    }
    return {name: a.astype(np.float32) for name, a in arrays.items()}


def session(
    w: dict[str, np.ndarray], top_k: int, precision: str, threads: int, slices: int = 1
) -> ort.InferenceSession:
    """The lowered single-layer graph for `precision` (fp32: and `slices`) in an engine's session options."""
    h = w["router"].shape[1]
    node = helper.make_node(
        contract.OP_TYPE,
        [INPUT, "router", "w1", "w3", "w2"],
        [OUTPUT],
        domain=contract.DOMAIN,
        **contract.node_attributes(top_k),
    )
    graph = helper.make_graph(
        [node],
        "moe",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["tokens", h])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["tokens", h])],
        initializer=[numpy_helper.from_array(a, name) for name, a in w.items()],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(contract.DOMAIN, 1)]
    model = ir.from_proto(helper.make_model(graph, opset_imports=opsets))
    lower_topk_moe(model, precision, slices)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), session_options(threads))


def expert_bytes(precision: str, h: int, f: int) -> float:
    """Bytes one expert's three projections occupy (weights + scales for quantized precisions)."""
    spec = PRECISIONS[precision]
    if spec is None:
        return 3 * h * f * 4
    return 3 * h * f * (spec.bits / 8 + 4 / spec.block)


def time_once(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e3


def run(tokens: list[int], h: int, f: int, e: int, k: int, threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    w = weights(h, f, e)
    sessions = {p: session(w, k, p, threads) for p in PRECISIONS}
    sessions["fp32-sliced"] = session(w, k, "fp32", threads, moe_slices(threads, f))
    tw = [torch.from_numpy(w[n]) for n in ("router", "w1", "w3", "w2")]
    rng = np.random.default_rng(1)
    rows = []
    for t in tokens:
        # 16 inputs taken in turn: which experts a token picks decides how ORT's threads share the work
        inputs = itertools.cycle([rng.standard_normal((t, h)).astype(np.float32) for _ in range(16)])
        x = next(inputs)
        ref = sparse_moe(torch.from_numpy(x), *tw, k).numpy()
        fns = {p: (lambda s=s, xs=inputs: s.run(None, {INPUT: next(xs)})) for p, s in sessions.items()}
        fns["eager"] = lambda xs=inputs: sparse_moe(torch.from_numpy(next(xs)), *tw, k)
        iters = max(1, 64 // t)
        for fn in fns.values():  # warm-up (prepacking, allocator)
            time_once(fn, 2)
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name].append(time_once(fn, iters))
        fp32_ms = statistics.median(samples["fp32"])
        for name, times in samples.items():
            ms = statistics.median(times)
            out = sessions[name].run(None, {INPUT: x}) if name in sessions else sparse_moe(torch.from_numpy(x), *tw, k)
            y = out.numpy() if isinstance(out, torch.Tensor) else out[0]
            row = {
                "variant": name,
                "tokens": t,
                "ms": ms,
                "speedup_vs_fp32_moe": fp32_ms / ms,
                "rel_rms_err": float(np.sqrt(((y - ref) ** 2).mean() / (ref**2).mean())),
            }
            if t == 1:
                per_expert = expert_bytes("fp32" if name in ("eager", "fp32-sliced") else name, h, f)
                row["expert_gbs"] = k * per_expert / ms / 1e6
            rows.append(row)
    return {
        "config": {"hidden": h, "intermediate": f, "experts": e, "top_k": k, "threads": threads, "rounds": rounds},
        "quantization": {p: (None if s is None else vars(s)) for p, s in PRECISIONS.items()},
        "onnxruntime": ort.__version__,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = result["config"]
    title = (
        f"One MoE layer on ORT CPU: H={cfg['hidden']} F={cfg['intermediate']} E={cfg['experts']} "
        f"k={cfg['top_k']}, {cfg['threads']} threads, median of {cfg['rounds']} interleaved rounds"
    )
    table = Table(title=title)
    for column in ("variant", "tokens", "ms", "x fp32 MoE", "rel RMS err", "expert GB/s"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in result["rows"]:
        gbs = row.get("expert_gbs")
        table.add_row(
            row["variant"],
            str(row["tokens"]),
            f"{row['ms']:.2f}",
            f"{row['speedup_vs_fp32_moe']:.2f}",
            f"{row['rel_rms_err']:.2e}",
            "" if gbs is None else f"{gbs:.1f}",
        )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.tokens, args.hidden, args.intermediate, args.experts, args.top_k, args.threads, args.rounds)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
