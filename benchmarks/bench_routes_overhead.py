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

A second figure that load on the machine hardly moves: ORT's profiler over one generation with and without
the routing outputs; the nodes only the routing session runs (the inlined routing function) are summed per
decode step and divided by the decode step's model-run time (`routing_op_share`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from moetrt.artifacts import manifest_config, read_manifest  # noqa: E402
from moetrt.bench.prepare import prepare  # noqa: E402
from moetrt.bench.workload import random_prompt  # noqa: E402
from moetrt.cachedir import cache_root, preset_checkpoint  # noqa: E402
from moetrt.devices import providers  # noqa: E402
from moetrt.names import MODEL_FILE  # noqa: E402
from moetrt.routes.live import ExpertLoad  # noqa: E402
from moetrt.routes.trace import routing_outputs  # noqa: E402
from moetrt.runtime.engine import load_backend  # noqa: E402
from moetrt.runtime.generate import generate, stream  # noqa: E402
from moetrt.runtime.ort_backend import OrtBackend  # noqa: E402
from moetrt.runtime.ort_session import add_graph_outputs, session_options  # noqa: E402

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


def routing_op_share(engine: Path, prompt: list[int], new_tokens: int, threads: int) -> dict[str, float]:
    """Per decode step: the routing nodes' kernel time (us) and its share of the model run, from ORT's profiler."""
    import onnxruntime as ort

    manifest = read_manifest(engine, "engine")
    config = manifest_config(manifest)
    events = {}
    for variant, extra in (("off", []), ("outputs", routing_outputs(config.num_hidden_layers))):
        with tempfile.TemporaryDirectory() as tmp:
            so = session_options(threads)
            so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "ort")
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(engine))
            model = add_graph_outputs(engine / MODEL_FILE, extra).SerializeToString()
            session = ort.InferenceSession(model, so, providers=providers(manifest["device"]))
            backend = OrtBackend(session, config, 1, int(manifest["max_seq_len"]), manifest["dtype"], extra)
            generate(backend, [prompt], new_tokens, stop_token_ids=())
            events[variant] = json.loads(Path(session.end_profiling()).read_text())
            backend.close()
    base = {e["name"] for e in events["off"] if e.get("cat") == "Node"}
    trace = events["outputs"]
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])[1:]  # decode steps
    start = runs[0]["ts"]
    routing = sum(e["dur"] for e in trace if e.get("cat") == "Node" and e["name"] not in base and e["ts"] >= start)
    model = sum(e["dur"] for e in runs)
    return {"routing_us_per_step": routing / len(runs), "model_run_us_per_step": model / len(runs),
            "routing_share": routing / model}  # fmt: skip


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
    parser.add_argument("--profile-only", action="store_true", help="only the ORT profiler figure")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "docs" / "routes_overhead.json")
    args = parser.parse_args()

    checkpoint, _ = preset_checkpoint(args.preset)
    workdir = args.workdir or cache_root() / "bench" / args.preset
    backends = [f"ort-{p}" for p in args.precisions.split(",")]
    max_seq = args.max_seq_len or args.prompt_len + args.new_tokens
    engines, _ = prepare(checkpoint, backends, workdir, max_seq, 1, args.threads, reuse=True)
    vocab = manifest_config(read_manifest(engines[backends[0]], "engine")).vocab_size
    prompt = random_prompt(vocab, 1, args.prompt_len)[0].tolist()

    profile = {b: routing_op_share(engines[b], prompt, min(args.new_tokens, 32), args.threads) for b in backends}
    data = json.loads(args.json.read_text()) if args.profile_only and args.json.is_file() else {}
    if not args.profile_only:
        data["setup"] = {"preset": args.preset, "rounds": args.rounds, "prompt_len": args.prompt_len,
                         "new_tokens": args.new_tokens, "threads": args.threads, "max_seq_len": max_seq}  # fmt: skip
        data["rows"] = measure(engines, backends, prompt, args.rounds, args.new_tokens, args.threads)
        print(f"{'backend':10} {'variant':9} {'decode tok/s':>12} {'vs off':>8}")
        for row in data["rows"]:
            print(
                f"{row['backend']:10} {row['variant']:9} {row['decode_tokens_per_s']:12.1f} {row['ratio_to_off']:8.3f}"
            )
    for b, figures in profile.items():
        print(
            f"{b}: routing ops {figures['routing_us_per_step']:.0f} us per decode step of "
            f"{figures['model_run_us_per_step']:.0f} us ({figures['routing_share']:.2%}, ORT profiler)"
        )
    data["profile"] = profile
    args.json.write_text(json.dumps(data, indent=1) + "\n")


def measure(engines: dict[str, Path], backends: list[str], prompt: list[int], rounds: int, new_tokens: int,
            threads: int) -> list[dict]:  # fmt: skip
    """Interleaved rounds of every (backend, variant); medians and same-round ratios to `off`."""
    runs: dict[tuple[str, str], list[float]] = {(b, v): [] for b in backends for v in VARIANTS}
    for r in range(rounds):
        for b in backends:
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                runs[b, v].append(decode_tokens_per_s(engines[b], v, prompt, new_tokens, threads))
                print(f"round {r + 1}/{rounds} {b} {v}: {runs[b, v][-1]:.1f} tok/s", file=sys.stderr)
    rows = []
    for b in backends:
        for v in VARIANTS:
            ratios = [on / off for on, off in zip(runs[b, v], runs[b, "off"], strict=True)]
            rows.append({"backend": b, "variant": v, "decode_tokens_per_s": statistics.median(runs[b, v]),
                         "ratio_to_off": statistics.median(ratios), "runs": runs[b, v]})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
