"""Where an ONNX Runtime engine's time goes: ORT's own profiler over a generation, summed by op type.

    python benchmarks/profile_ort.py ENGINE_DIR [--prompt-len 128] [--new-tokens 32] [--batch 1] [--threads 2]

The engine is opened with the session options moetrt serves it with (moetrt.runtime.ort_session) plus
`SessionOptions.enable_profiling`, and driven by the shared generation loop through `OrtBackend`. Two
generations run; only the second is summarised (the first pays for first-call allocations and prepacking).
Its first model run is the prefill, the others are decode steps. Per op type: milliseconds per decode step
and share of the decode step, milliseconds of the prefill; `(outside nodes)` is the part of each run that no
node accounts for (input/output binding, allocation, thread-pool hand-offs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from moetrt.artifacts import manifest_config  # noqa: E402
from moetrt.bench.workload import random_prompt  # noqa: E402
from moetrt.devices import providers  # noqa: E402
from moetrt.runtime.generate import generate  # noqa: E402
from moetrt.runtime.ort_backend import OrtBackend, read_engine_manifest  # noqa: E402
from moetrt.runtime.ort_session import session_options  # noqa: E402


def profile_engine(engine_dir: Path, prompt_len: int, new_tokens: int, batch: int, threads: int) -> list[dict]:
    """The ORT profiler's events of two greedy generations on a random prompt (moetrt.bench.workload)."""
    import onnxruntime as ort

    manifest = read_engine_manifest(engine_dir)
    config = manifest_config(manifest)
    so = session_options(threads)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(engine_dir / "model.onnx"), so, providers=providers(manifest["device"]))
        backend = OrtBackend(session, config, batch, int(manifest["max_seq_len"]), manifest["dtype"])
        prompts = random_prompt(config.vocab_size, batch, prompt_len).tolist()
        for _ in range(2):
            generate(backend, prompts, new_tokens, stop_token_ids=())
        events = json.loads(Path(session.end_profiling()).read_text())
        backend.close()
    return events


def summarize(events: list[dict[str, Any]], new_tokens: int) -> tuple[dict[str, dict[str, float]], float, float]:
    """Per op type {decode_ms (per step), prefill_ms}, plus the decode step's and the prefill's run times (ms).

    Node events are assigned to the model run whose time window holds them; the last `new_tokens` runs are the
    second generation (prefill, then new_tokens - 1 decode steps)."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-new_tokens:]
    prefill, decode = runs[0], runs[1:]
    per_op: dict[str, dict[str, float]] = defaultdict(lambda: {"decode_ms": 0.0, "prefill_ms": 0.0})
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name", "?")
        if prefill["ts"] <= event["ts"] <= prefill["ts"] + prefill["dur"]:
            per_op[op]["prefill_ms"] += event["dur"] / 1e3
        elif any(r["ts"] <= event["ts"] <= r["ts"] + r["dur"] for r in decode):
            per_op[op]["decode_ms"] += event["dur"] / 1e3 / len(decode)
    decode_ms = sum(r["dur"] for r in decode) / 1e3 / len(decode)
    prefill_ms = prefill["dur"] / 1e3
    per_op["(outside nodes)"] = {
        "decode_ms": decode_ms - sum(v["decode_ms"] for v in per_op.values()),
        "prefill_ms": prefill_ms - sum(v["prefill_ms"] for v in per_op.values()),
    }
    return dict(per_op), decode_ms, prefill_ms


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    events = profile_engine(args.engine_dir, args.prompt_len, args.new_tokens, args.batch, args.threads)
    per_op, decode_ms, prefill_ms = summarize(events, args.new_tokens)
    print(f"{args.engine_dir}: decode step {decode_ms:.2f} ms, prefill {prefill_ms:.1f} ms "
          f"(prompt {args.prompt_len}, batch {args.batch}, {args.threads} threads)")  # fmt: skip
    print(f"{'op type':<28}{'decode ms/step':>16}{'% decode':>10}{'prefill ms':>12}{'% prefill':>11}")
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1]["decode_ms"])
    for op, t in ranked[: args.top]:
        print(f"{op:<28}{t['decode_ms']:>16.3f}{100 * t['decode_ms'] / decode_ms:>10.1f}"
              f"{t['prefill_ms']:>12.1f}{100 * t['prefill_ms'] / prefill_ms:>11.1f}")  # fmt: skip
    summary = {"engine": str(args.engine_dir), "decode_ms": decode_ms, "prefill_ms": prefill_ms, "ops": per_op}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
