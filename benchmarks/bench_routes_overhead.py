"""What the routing outputs cost: decode tokens/s of an engine with `layers.{i}.expert_ids` off and on.

    python benchmarks/bench_routes_overhead.py [--preset mid] [--precisions fp32,int4] [--rounds 5]
        [--prompt-len 128] [--new-tokens 128] [--threads 2] [--max-seq-len N] [--workdir DIR]
        [--json docs/routes_overhead.json]

Variants, each its own engine load in this process, interleaved round by round (the order rotates):
    off        the engine as `moetrt generate` opens it (no routing function is called)
    outputs    loaded with the routing outputs (one Softmax/TopK call per layer, ids returned each step)
    counters   outputs + `moetrt.routes.live.ExpertLoad.observe` after every step (what a server does)
Decode tokens/s is timed here around the consumer loop (so `counters` includes the host-side counting):
tokens after the first / seconds from the first token to the last. Figures are medians over rounds and each
variant's ratio to `off` of the same round, median over rounds. Absolute numbers move 3-5x on a shared
machine; only the same-run ratios compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from moetrt.artifacts import manifest_config, read_manifest  # noqa: E402
from moetrt.bench.prepare import prepare  # noqa: E402
from moetrt.bench.workload import random_prompt  # noqa: E402
from moetrt.cachedir import cache_root, preset_checkpoint  # noqa: E402
from moetrt.routes.live import ExpertLoad  # noqa: E402
from moetrt.routes.trace import routing_outputs  # noqa: E402
from moetrt.runtime.engine import load_backend  # noqa: E402
from moetrt.runtime.generate import stream  # noqa: E402

VARIANTS = ("off", "outputs", "counters")


def decode_tokens_per_s(engine: Path, variant: str, prompt: list[int], new_tokens: int, threads: int) -> float:
    from prometheus_client import CollectorRegistry

    config = manifest_config(read_manifest(engine, "engine"))
    layers, experts = config.num_hidden_layers, config.num_local_experts
    extra = () if variant == "off" else routing_outputs(layers)
    load = ExpertLoad(layers, experts, registry=CollectorRegistry()) if variant == "counters" else None
    with load_backend(engine, max_batch=1, threads=threads, extra_outputs=extra) as backend:
        for _ in stream(backend, [prompt[:16]], 8, stop_token_ids=()):  # warm-up: first-call allocations
            pass
        steps, first = 0, 0.0
        for event in stream(backend, [prompt], new_tokens, stop_token_ids=()):
            if load is not None:
                load.observe(backend.extras)
            if event.step == 0:
                first = time.perf_counter()
            steps = event.step
        return steps / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=None, help="the engines' (default: prompt + new tokens)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "docs" / "routes_overhead.json")
    args = parser.parse_args()

    checkpoint, _ = preset_checkpoint(args.preset)
    workdir = args.workdir or cache_root() / "bench" / args.preset
    backends = [f"ort-{p}" for p in args.precisions.split(",")]
    max_seq = args.max_seq_len or args.prompt_len + args.new_tokens
    engines, _ = prepare(checkpoint, backends, workdir, max_seq, 1, args.threads, reuse=True)
    vocab = manifest_config(read_manifest(engines[backends[0]], "engine")).vocab_size
    prompt = random_prompt(vocab, 1, args.prompt_len)[0].tolist()

    runs: dict[tuple[str, str], list[float]] = {(b, v): [] for b in backends for v in VARIANTS}
    for r in range(args.rounds):
        for b in backends:
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                runs[b, v].append(decode_tokens_per_s(engines[b], v, prompt, args.new_tokens, args.threads))
                print(f"round {r + 1}/{args.rounds} {b} {v}: {runs[b, v][-1]:.1f} tok/s", file=sys.stderr)

    rows = []
    for b in backends:
        for v in VARIANTS:
            ratios = [on / off for on, off in zip(runs[b, v], runs[b, "off"], strict=True)]
            rows.append({"backend": b, "variant": v, "decode_tokens_per_s": statistics.median(runs[b, v]),
                         "ratio_to_off": statistics.median(ratios), "runs": runs[b, v]})  # fmt: skip
    print(f"{'backend':10} {'variant':9} {'decode tok/s':>12} {'vs off':>8}")
    for row in rows:
        print(f"{row['backend']:10} {row['variant']:9} {row['decode_tokens_per_s']:12.1f} {row['ratio_to_off']:8.3f}")
    setup = {"preset": args.preset, "rounds": args.rounds, "prompt_len": args.prompt_len,
             "new_tokens": args.new_tokens, "threads": args.threads, "max_seq_len": max_seq}  # fmt: skip
    args.json.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
