"""moetrt against its peers on one machine in one run: the benchmark table of the README.

    python benchmarks/run_all.py [--rounds 3] [--batches 1,4] [--prompt-len 128] [--new-tokens 128] [--threads 2]
                                 [--max-seq-len N] [--contexts 256,1024,2048,4000] [--backends a,b,...]

Engines are exported the way a user gets them: KV capacity --max-seq-len, by default the preset's
max_position_embeddings (4096 for mid); ORT GenAI gets the same capacity (its max_length) and the eager
backends the same static cache. --contexts runs a context sweep: per context C a prompt of C - new_tokens.

On the `mid` preset (hidden 1024, 8 layers, 16/4 heads, 8 experts top-2, vocab 32000; 0.79B parameters,
fp32), seeded checkpoint cached in $MOETRT_CACHE:
    moetrt    eager, ort-fp32, ort-int8, ort-int4        (moetrt.bench: export once, build each engine)
    HF        hf-eager-dynamic (the reference), hf-eager-static      (benchmarks/peers/hf.py)
    ORT GenAI ortgenai-fp32, ortgenai-int8, ortgenai-int4            (benchmarks/peers/ortgenai.py)
Every measurement runs in its own process with the same prompt (moetrt.bench.workload.random_prompt), the
same warmup and the same thread count. Rounds are interleaved over all backends and batch sizes, and each
figure is the median over rounds; ratios are to hf-eager-dynamic at the same batch, measured in the same
rounds. Writes docs/benchmark.json (every row + machine, bandwidth, goals), docs/benchmark.md and
docs/benchmark.png. The heavy preparation (checkpoint, export, engine builds, ORT GenAI builds) runs in
child processes too, so this process stays small and cannot inflate any child's memory figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python benchmarks/run_all.py` from anywhere: `benchmarks.peers` imports

from benchmarks.peers.common import run_isolated  # noqa: E402
from benchmarks.peers.run_peers import backend_call, ensure_ortgenai_model  # noqa: E402
from moetrt.bench import report  # noqa: E402
from moetrt.bench.prepare import bench_backends  # noqa: E402
from moetrt.model.config import PRESETS  # noqa: E402

REFERENCE = "hf-eager-dynamic"
MOETRT = ("eager", "ort-fp32", "ort-int8", "ort-int4")
PEERS = ("hf-eager-dynamic", "hf-eager-static", "ortgenai-fp32", "ortgenai-int8", "ortgenai-int4")


def prepare_moetrt(
    preset: str, workdir: str, max_seq_len: int, max_batch: int, threads: int, reuse: bool
) -> dict[str, Any]:
    """(Child process) the seeded checkpoint, one export, the three ORT engines; JSON-ready paths and costs."""
    from moetrt.bench.prepare import prepare
    from moetrt.cachedir import preset_checkpoint

    t0 = time.perf_counter()
    checkpoint, reused = preset_checkpoint(preset)
    steps = [{"step": "checkpoint", "seconds": time.perf_counter() - t0, "reused": reused, "path": str(checkpoint)}]
    paths, built = prepare(checkpoint, list(MOETRT), Path(workdir), max_seq_len, max_batch, threads, reuse)
    steps += [{"step": s.step, "seconds": s.seconds, "reused": s.reused, "path": str(s.path)} for s in built]
    return {"checkpoint": str(checkpoint), "paths": {k: str(v) for k, v in paths.items()}, "steps": steps}


def measure(
    name: str, batch: int, prompt_len: int, args: argparse.Namespace, paths: dict[str, str], models: dict[str, Path]
) -> dict:
    """One measurement of backend `name` at `batch` and `prompt_len` in a fresh process, as a report row."""
    workload = {"prompt_len": prompt_len, "new_tokens": args.new_tokens, "batch": batch, "threads": args.threads}
    if name in MOETRT:
        kwargs = {"path": paths[name], "backend": name, "max_seq_len": args.max_seq_len, **workload}
        run = run_isolated("moetrt.bench.measure:measure", kwargs, threads=args.threads, timeout=args.timeout)
        return {**run, "precision": bench_backends()[name][1], "max_seq_len": args.max_seq_len, **workload}
    peer_args = argparse.Namespace(**{**vars(args), "prompt_len": prompt_len}, batch=batch, seed=0, warmup_tokens=16)
    target, kwargs = backend_call(name, peer_args, models)
    if name.startswith("ortgenai"):
        kwargs["max_length"] = args.max_seq_len
    run = run_isolated(target, kwargs, threads=args.threads, timeout=args.timeout)
    # The peers time from the call to the first token on the host: moetrt's TTFT. They have no prefill-step-only
    # figure, and run on the CPU.
    return {**run, "backend": name, "ttft_ms": run["prefill_ms"], "prefill_ms": None, "gpu_mem_bytes": None, **workload}


def goals(rows: list[dict[str, Any]], prompt_len: int) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on the batch-1 rows of this run at `prompt_len`."""
    by = {r["backend"]: r for r in rows if r["batch"] == 1 and r["prompt_len"] == prompt_len}

    def ratio(a: str, b: str) -> float | None:
        return by[a]["decode_tokens_per_s"] / by[b]["decode_tokens_per_s"] if a in by and b in by else None

    fp32 = by.get("ort-fp32", {}).get("bound_fraction")
    checks = [
        ("ORT fp32 decode >= 1.9x HF eager", ratio("ort-fp32", REFERENCE), 1.9),
        ("ORT fp32 decode >= 90% of the fp32 bandwidth bound", fp32, 0.9),
        ("ORT int8 decode >= 5.5x HF eager fp32", ratio("ort-int8", REFERENCE), 5.5),
        ("ORT int4 decode > ORT int8", ratio("ort-int4", "ort-int8"), 1.0),
    ]
    checks += [(f"ORT {p} decode >= 1.0x ORT GenAI {p}", ratio(f"ort-{p}", f"ortgenai-{p}"), 1.0) for p in
               ("fp32", "int8", "int4")]  # fmt: skip
    return [{"goal": g, "value": v, "target": t, "met": v is not None and v >= t} for g, v, t in checks]


def write_markdown(path: Path, rows: list[dict], met: list[dict], meta: dict[str, Any]) -> None:
    bw = meta["bandwidth"]
    lines = [
        "# moetrt vs peers (generated by `python benchmarks/run_all.py`; do not edit)",
        "",
        f"`{meta['preset']}` preset (fp32 seeded checkpoint), prompt {meta['prompt_len']}, {meta['new_tokens']} new "
        f"tokens, {meta['threads']} threads, median of {meta['rounds']} interleaved rounds, each measurement in its "
        f"own process. Machine: {meta['machine']['cpu_count']} CPUs, {meta['machine']['platform']}; read bandwidth "
        f"{bw['gbs']:.1f} GB/s (median of the rounds). Ratios (`x ref`) are to {REFERENCE} at the same batch in the "
        "same rounds; absolute numbers drift between rounds and runs (a VM), so read ratios. TTFT = time to first "
        "token; `prefill ms` is the prefill step alone (moetrt only). `% of bound` = decode / (bandwidth / bytes a "
        "decode step reads at that stack's precision); batch 4 uses the expected number of distinct experts under "
        "uniform routing.",
        "",
        report.markdown(rows),
        "## Goals (batch 1)",
        "",
        "| goal | measured | target | met |",
        "|---|---:|---:|---|",
    ]
    for g in met:
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"| {g['goal']} | {value} | {g['target']} | {'yes' if g['met'] else 'NO'} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid", help="mid (the README's table); tiny for a smoke test")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="default: $MOETRT_CACHE/bench/run_all")
    parser.add_argument("--reuse", action="store_true", help="keep moetrt artifacts an earlier run made alike")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs", help="where benchmark.{json,md,png} go")
    parser.add_argument("--max-seq-len", type=int, default=None, help="KV capacity (default: max_position_embeddings)")
    parser.add_argument("--contexts", default=None, help="context sweep, e.g. 256,1024: prompt = C - new tokens")
    parser.add_argument("--backends", default=None, help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    args.max_seq_len = args.max_seq_len or PRESETS[args.preset].max_position_embeddings
    from moetrt.bench.run import sweep_prompts

    prompts = sweep_prompts(args.contexts, args.new_tokens) if args.contexts else [args.prompt_len]
    from moetrt.cachedir import cache_root

    workdir = args.workdir or cache_root() / "bench" / f"run_all-{args.preset}"
    t_start = time.perf_counter()
    print("preparing moetrt artifacts (checkpoint, export, engines) ...", flush=True)
    prep = run_isolated("benchmarks.run_all:prepare_moetrt", {"preset": args.preset, "workdir": str(workdir),
                        "max_seq_len": args.max_seq_len, "max_batch": max(batches),
                        "threads": args.threads, "reuse": args.reuse}, timeout=7200)  # fmt: skip
    for step in prep["steps"]:
        cost = "reused" if step["reused"] else f"{step['seconds']:.1f} s"
        print(f"  {step['step']}: {cost} -> {step['path']}")
    args.checkpoint = Path(prep["checkpoint"])
    backends = [REFERENCE, *MOETRT, *(p for p in PEERS if p != REFERENCE)]
    if args.backends:
        backends = [b for b in backends if b in args.backends.split(",")]
    models = {}
    for name in backends:
        if name.startswith("ortgenai"):
            models[name] = ensure_ortgenai_model(args.checkpoint, workdir / "ortgenai", name.split("-")[1], 3600)
    runs: dict[tuple[str, int, int], list[dict]] = {(b, n, p): [] for n in batches for p in prompts for b in backends}
    errors: dict[str, str] = {}
    bandwidths = []
    for rnd in range(1, args.rounds + 1):
        # Measured every round too: on a shared machine the bandwidth a process gets drifts like its speed.
        bandwidths.append(run_isolated("moetrt.bench.bandwidth:read_bandwidth_gbs", {"threads": args.threads},
                                       args.threads))  # fmt: skip
        print(f"round {rnd}/{args.rounds} read bandwidth {bandwidths[-1]['gbs']:.1f} GB/s", flush=True)
        for batch, prompt, name in ((b, p, n) for b in batches for p in prompts for n in backends):
            key = f"{name} b{batch} prompt {prompt}"
            if key in errors:
                continue
            print(f"round {rnd}/{args.rounds} {key} (loadavg {os.getloadavg()[0]:.1f}) ...", end=" ", flush=True)
            try:
                run = measure(name, batch, prompt, args, prep["paths"], models)
            except RuntimeError as err:
                errors[key] = str(err)
                print(f"FAILED\n{err}", flush=True)
                continue
            runs[(name, batch, prompt)].append(run)
            with open(workdir / "runs.jsonl", "a") as log:  # the raw runs survive a crash in the summary
                log.write(json.dumps({"round": rnd, **run}) + "\n")
            print(f"TTFT {run['ttft_ms']:.0f} ms, decode {run['decode_tokens_per_s']:.2f} tok/s", flush=True)

    bandwidth = {"gbs": statistics.median(b["gbs"] for b in bandwidths), "rounds": bandwidths}
    rows = [report.summarize(r) for r in runs.values() if r]
    config = PRESETS[args.preset]
    reference = REFERENCE if REFERENCE in backends else backends[0]
    for prompt in prompts:
        report.annotate([r for r in rows if r["prompt_len"] == prompt], config, bandwidth["gbs"], reference)
    met = goals(rows, prompts[0])
    meta = {
        "command": "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset,
        "prompt_len": args.prompt_len,
        "contexts": args.contexts,
        "max_seq_len": args.max_seq_len,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "rounds": args.rounds,
        "batches": batches,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "bandwidth": bandwidth,
        "preparation": prep["steps"],
        "errors": errors,
        "wall_s": time.perf_counter() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in row.items() if k != "token_ids"} for row in rows]
    (args.out / "benchmark.json").write_text(json.dumps({**meta, "goals": met, "rows": slim}, indent=1) + "\n")
    write_markdown(args.out / "benchmark.md", rows, met, meta)
    from moetrt.bench.plot import plot

    title = (f"{args.preset} preset, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads "
             f"(median of {args.rounds} rounds)")  # fmt: skip
    plot(rows, args.out / "benchmark.png", title)
    from rich.console import Console

    from moetrt.cli import bench_table

    Console(width=170).print(bench_table(rows, f"moetrt vs peers ({args.preset} preset)"))
    for g in met:
        print(f"{'met   ' if g['met'] else 'MISSED'} {g['goal']}: {g['value'] and round(g['value'], 3)}")
    print(f"wrote {args.out}/benchmark.{{json,md,png}} in {meta['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
