"""Does KV capacity cost? The same generation on engines exported at two `max_seq_len`s, in one run.

    python benchmarks/bench_capacity.py [--preset mid] [--capacities 256,4096] [--rounds 3] [--threads 2]
                                        [--backends ort-fp32,ort-int8,ort-int4] [--out docs/capacity.json]

Per capacity one export and the requested engines (moetrt.bench.prepare), then interleaved rounds over every
(engine, capacity) in alternating order, each measurement in its own process (moetrt.bench.measure), prompt 128 and
128 new tokens by default. Prints decode tok/s per engine and capacity and the ratio of each larger capacity
to the smallest, the same run's medians: with attention over each row's live length (GroupQueryAttention)
the ratio should be ~1; with attention over the whole static cache it falls as the capacity grows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rich.console import Console  # noqa: E402

from moetrt.bench.isolate import run_isolated  # noqa: E402
from moetrt.bench.prepare import parse_backends, prepare  # noqa: E402
from moetrt.cachedir import cache_root, preset_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--capacities", default="256,4096")
    parser.add_argument("--backends", default="ort-fp32,ort-int8,ort-int4")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="keep artifacts an earlier run made alike")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "capacity.json")
    args = parser.parse_args(argv)
    console = Console(width=150)
    capacities = [int(c) for c in args.capacities.split(",")]
    backends = parse_backends(args.backends)
    checkpoint, _ = preset_checkpoint(args.preset)
    paths = {}
    for capacity in capacities:
        workdir = cache_root() / "bench" / f"capacity-{args.preset}-{capacity}"
        built, steps = prepare(checkpoint, backends, workdir, capacity, 1, args.threads, args.reuse)
        for step in steps:
            console.print(f"{step.step} @ {capacity}: {'reused' if step.reused else f'{step.seconds:.1f} s'}")
        paths |= {(name, capacity): path for name, path in built.items()}
    workload = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1, "threads": args.threads}
    runs: dict[str, list[dict]] = {f"{name} @{c}": [] for name, c in paths}
    errors = {}
    for rnd in range(1, args.rounds + 1):
        order = list(paths.items())
        for (name, capacity), path in order if rnd % 2 else reversed(order):  # ABBA: load drift cancels out
            key = f"{name} @{capacity}"
            if key in errors:
                continue
            try:
                kwargs = {"path": str(path), "backend": name, **workload}
                runs[key].append(run_isolated("moetrt.bench.measure:measure", kwargs, args.threads))
            except RuntimeError as err:
                errors[key] = str(err).splitlines()[0]
                continue
            console.print(f"round {rnd} {key}: decode {runs[key][-1]['decode_tokens_per_s']:.1f} tok/s", markup=False)
    rows = []
    for name in backends:
        speeds = {c: [r["decode_tokens_per_s"] for r in runs[f"{name} @{c}"]] for c in capacities}
        medians = {c: statistics.median(v) for c, v in speeds.items() if v}
        base = medians.get(capacities[0])
        rows.append({"backend": name, "decode_tokens_per_s": speeds, "median": medians,
                     "ratio_to_smallest": {c: m / base for c, m in medians.items()} if base else None,
                     "prefill_ms": {c: statistics.median(r["prefill_ms"] for r in runs[f"{name} @{c}"])
                                    for c in capacities if runs[f"{name} @{c}"]},
                     "peak_rss_bytes": {c: max(r["peak_rss_bytes"] for r in runs[f"{name} @{c}"])
                                        for c in capacities if runs[f"{name} @{c}"]}})  # fmt: skip
        cells = ", ".join(f"{c}: {m:.1f} tok/s" for c, m in medians.items())
        ratios = ", ".join(f"{c}/{capacities[0]} = {r:.3f}" for c, r in (rows[-1]["ratio_to_smallest"] or {}).items())
        console.print(f"{name}: {cells}; {ratios}", markup=False)
    meta = {"command": "python benchmarks/bench_capacity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            **workload, "preset": args.preset, "rounds": args.rounds, "errors": errors}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
