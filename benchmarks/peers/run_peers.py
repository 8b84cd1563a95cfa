"""Run the peer baselines on one checkpoint, each in its own process, and print/save one comparison.

    python -m benchmarks.peers.run_peers --checkpoint /tmp/mid_ckpt \\
        [--prompt-len 128 --new-tokens 128 --batch 1 --threads 2 --json peers.json]

Backends: hf-eager-dynamic (the default reference: ratios and token agreement are against the first
backend listed), hf-eager-static, hf-sdpa-dynamic, hf-sdpa-static, hf-eager-dynamic-loop (transformers'
per-expert Python loop instead of its default grouped_mm experts), ortgenai-fp32, ortgenai-int8,
ortgenai-int4; default: hf-eager-dynamic, hf-eager-static and the three ortgenai. A backend that fails
or times out is reported as such and the others still run. ORT GenAI models are built once into
--models-dir and reused while the checkpoint is unchanged. With --rounds R every backend runs R times,
interleaved (round 1: all backends, round 2: all backends, ...), and the median is reported: on a
shared machine absolute numbers drift, and interleaving spreads the drift. "x ref p10 step" compares
the 10th-percentile decode step times, the steps least disturbed by other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.peers.common import run_isolated
from moetrt.bench import bandwidth
from moetrt.bench.report import prefix_match

HF_BACKENDS: dict[str, dict[str, Any]] = {
    "hf-eager-dynamic": {"attn": "eager", "cache": "dynamic"},
    "hf-eager-static": {"attn": "eager", "cache": "static"},
    "hf-sdpa-dynamic": {"attn": "sdpa", "cache": "dynamic"},
    "hf-sdpa-static": {"attn": "sdpa", "cache": "static"},
    "hf-eager-dynamic-loop": {"attn": "eager", "cache": "dynamic", "experts": "eager"},
}
ORT_BACKENDS = ("ortgenai-fp32", "ortgenai-int8", "ortgenai-int4")
DEFAULT_BACKENDS = ("hf-eager-dynamic", "hf-eager-static", *ORT_BACKENDS)
# Effective bytes per weight incl. block-32 fp32 scales (ORT GenAI keeps the router fp32).
PRECISIONS = ("fp32", "int8", "int4")


def checkpoint_stamp(checkpoint: Path) -> dict[str, Any]:
    """Identity of a checkpoint for the model cache: path plus name/size/mtime of its files."""
    files = sorted(p for p in checkpoint.iterdir() if p.is_file())
    return {"checkpoint": str(checkpoint), "files": [[p.name, p.stat().st_size, p.stat().st_mtime] for p in files]}


def ensure_ortgenai_model(checkpoint: Path, models_dir: Path, precision: str, timeout: float) -> Path:
    """Build (in a subprocess) the ORT GenAI model for `precision` unless an up-to-date one is there."""
    out = models_dir / f"ortgenai-{precision}"
    stamp_file = out / "built_from.json"
    stamp = checkpoint_stamp(checkpoint)
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    if out.exists():
        shutil.rmtree(out)
    print(f"building {out} ...", flush=True)
    t0 = time.perf_counter()
    kwargs = {"checkpoint_dir": str(checkpoint), "out_dir": str(out), "precision": precision}
    info = run_isolated("benchmarks.peers.ortgenai:build_for_runner", kwargs, timeout=timeout)
    stamp_file.write_text(json.dumps(stamp))
    print(
        f"built {out} in {time.perf_counter() - t0:.0f} s (peak RSS {info['peak_rss_bytes'] / 2**30:.1f} GiB)",
        flush=True,
    )
    return out


def backend_call(name: str, args: argparse.Namespace, models: dict[str, Path]) -> tuple[str, dict[str, Any]]:
    """The (target, kwargs) that `run_isolated` needs to measure backend `name`."""
    common = {
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "threads": args.threads,
        "seed": args.seed,
        "warmup_tokens": args.warmup_tokens,
    }
    if name in HF_BACKENDS:
        return "benchmarks.peers.hf:bench_hf", {"checkpoint_dir": str(args.checkpoint), **HF_BACKENDS[name], **common}
    return "benchmarks.peers.ortgenai:bench_ortgenai", {"model_dir": str(models[name]), **common}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result per backend: the medians of its rounds' timings (the first round's other fields)."""
    out = dict(runs[0])
    for key in ("prefill_ms", "decode_tokens_per_s", "decode_ms_per_step", "decode_step_ms_p10", "peak_rss_bytes"):
        out[key] = statistics.median(r[key] for r in runs)
    out["rounds"] = [{k: r[k] for k in ("prefill_ms", "decode_tokens_per_s", "loadavg_1m")} for r in runs]
    out["tokens_identical_across_rounds"] = all(r["token_ids"] == runs[0]["token_ids"] for r in runs)
    return out


def print_table(results: list[dict[str, Any]], membw: dict[str, Any] | None, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"peers on {args.checkpoint.name}: prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"batch {args.batch}, {args.threads} threads"
    )
    table = Table(title=title)
    cols = ("backend", "prefill ms", "decode tok/s", "x ref decode", "x ref prefill", "% bw bound", "x ref p10 step")
    cols = (*cols, "peak RSS GiB")
    for col in (*cols, "tokens = ref"):
        table.add_column(col, justify="left" if col == "backend" else "right", no_wrap=True)
    for r in results:
        bound = r.get("bw_bound_tokens_per_s")
        table.add_row(
            r["backend"],
            f"{r['prefill_ms']:.0f}",
            f"{r['decode_tokens_per_s']:.1f}",
            f"{r['decode_speedup_vs_ref']:.2f}",
            f"{r['prefill_speedup_vs_ref']:.2f}",
            f"{100 * r['decode_tokens_per_s'] / bound:.0f}" if bound else "-",
            f"{r['p10_step_speedup_vs_ref']:.2f}",
            f"{r['peak_rss_bytes'] / 2**30:.2f}",
            f"{r['tokens_match_ref']}/{args.new_tokens}",
        )
    console = Console(width=max(140, Console().width))
    console.print(table)
    if membw:
        console.print(
            f"read bandwidth {membw['gbs']:.1f} GB/s ({args.threads} threads; numpy {membw['numpy_gbs']:.1f}, "
            f"torch {membw.get('torch_gbs', float('nan')):.1f}); decode bytes/token fp32 "
            f"{membw['bytes_per_token']['fp32'] / 1e9:.3f} GB -> bound "
            f"{membw['bound_tokens_per_s']['fp32']:.1f} tok/s (batch 1)"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated; first is the ref")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup-tokens", type=int, default=16, help="new tokens of the warmup run (0: none)")
    parser.add_argument("--models-dir", type=Path, default=None, help="default: <checkpoint>.ortgenai/")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per measurement (and per build x2)")
    parser.add_argument("--no-membw", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.checkpoint = args.checkpoint.resolve()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    known = (*HF_BACKENDS, *ORT_BACKENDS)
    unknown = [b for b in backends if b not in known]
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {known}")
    models_dir = args.models_dir or args.checkpoint.with_name(args.checkpoint.name + ".ortgenai")

    models, errors = {}, {}
    for b in backends:
        if b in ORT_BACKENDS:
            try:
                models[b] = ensure_ortgenai_model(args.checkpoint, models_dir, b.split("-")[1], 2 * args.timeout)
            except RuntimeError as err:
                errors[b] = f"build failed: {err}"
                print(errors[b], flush=True)

    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for rnd in range(args.rounds):
        for b in backends:
            if b in errors:
                continue
            target, kwargs = backend_call(b, args, models)
            load = os.getloadavg()[0]
            print(f"round {rnd + 1}/{args.rounds}: {b} (loadavg {load:.1f}) ...", flush=True)
            try:
                result = run_isolated(target, kwargs, threads=args.threads, timeout=args.timeout)
            except RuntimeError as err:
                errors[b] = str(err)
                print(f"  FAILED: {str(err)[:2000]}", flush=True)
                continue
            result["loadavg_1m"] = load
            runs[b].append(result)
            print(
                f"  prefill {result['prefill_ms']:.0f} ms, decode {result['decode_tokens_per_s']:.2f} tok/s", flush=True
            )
    results = [summarize(runs[b]) for b in backends if b not in errors]
    if not results:
        raise SystemExit(f"every backend failed: {errors}")

    membw = None
    if not args.no_membw:
        from moetrt.model.config import MixtralConfig

        membw = run_isolated(
            "moetrt.bench.bandwidth:read_bandwidth_gbs", {"threads": args.threads}, threads=args.threads
        )
        config = MixtralConfig.from_pretrained(args.checkpoint)
        membw["bytes_per_token"] = {p: bandwidth.decode_bytes_per_token(config, p)["total"] for p in PRECISIONS}
        membw["bound_tokens_per_s"] = {
            p: bandwidth.bound_tokens_per_s(membw["gbs"], n) for p, n in membw["bytes_per_token"].items()
        }

    ref = results[0]  # the first backend that ran
    for r in results:
        r["decode_speedup_vs_ref"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        r["prefill_speedup_vs_ref"] = ref["prefill_ms"] / r["prefill_ms"]
        r["p10_step_speedup_vs_ref"] = ref["decode_step_ms_p10"] / r["decode_step_ms_p10"]
        r["tokens_match_ref"] = prefix_match(r["token_ids"], ref["token_ids"])
        if membw and args.batch == 1:
            r["bw_bound_tokens_per_s"] = membw["bound_tokens_per_s"][r["precision"]]
    print_table(results, membw, args)
    for b, err in errors.items():
        print(f"{b}: FAILED ({err.splitlines()[0]})")

    report = {
        "reference": ref["backend"],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "membw": membw,
        "results": results,
        "errors": errors,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
